import warnings

import pytest
import torch

from guidance import HFCLIPEncoder, load_encoder, parse_encoder_spec


def test_encode_shapes_and_dtype(encoder):
    img = torch.rand(3, 3, 50, 40)
    emb = encoder.encode_image(img)
    assert emb.shape == (3, encoder.embed_dim) and emb.dtype == torch.float32
    txt = encoder.encode_text(["a red circle", "a blue square on a white background"])
    assert txt.shape == (2, encoder.embed_dim)
    assert encoder.input_size == 32 and encoder.context_length == 77


def test_frozen_and_eval(encoder):
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_image_gradient_flows(encoder):
    img = torch.rand(2, 3, 64, 64, requires_grad=True)
    encoder.encode_image(img).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_resize_matches_preprocess_at_input_size(encoder):
    img = torch.rand(1, 3, 32, 32)
    x = encoder.preprocess(img)
    assert torch.allclose(x, (img - encoder.mean) / encoder.std)


def test_text_truncated_with_warning_naming_prompt(encoder):
    long = "a very long prompt " * 40
    with pytest.warns(UserWarning, match="a very long prompt.*truncated"):
        emb = encoder.encode_text([long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = encoder.encode_text(["short"])
    assert emb.shape == short.shape


def test_load_from_local_folder_matches(tmp_path):
    from tiny import save_tiny_clip, tiny_encoder

    folder = save_tiny_clip(tmp_path / "clip", seed=0)
    enc = load_encoder(str(folder), device="cpu")
    assert isinstance(enc, HFCLIPEncoder)
    ref = tiny_encoder(0)
    img = torch.rand(2, 3, 32, 32)
    assert torch.allclose(enc.encode_image(img), ref.encode_image(img), atol=1e-5)
    assert torch.allclose(enc.encode_text(["a fox"]), ref.encode_text(["a fox"]), atol=1e-5)


def test_missing_model_path_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder("./models/clip")


def test_offline_hub_id_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not load CLIP model 'nobody/no-such-clip'.*offline"):
        load_encoder("nobody/no-such-clip")


def test_bad_precision_and_device():
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        load_encoder("x/y", device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        load_encoder("x/y", device="cpu", precision="fp8")


def test_encoder_spec_weights():
    assert parse_encoder_spec("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", 1.0)
    assert parse_encoder_spec("openai/clip-vit-base-patch32=0.5") == ("openai/clip-vit-base-patch32", 0.5)
