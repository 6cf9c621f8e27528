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


# -- the patch embedding as a matrix product (guidance.patch_embedding) -----------------------------------------
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_matmul_patch_embedding_is_the_convolution(dtype, atol):
    from guidance.patch_embedding import MatmulPatchEmbedding

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8, bias=True).to(dtype).requires_grad_(False)
    fast = MatmulPatchEmbedding(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias
    x = torch.rand(2, 3, 35, 33, dtype=dtype, requires_grad=True)         # trailing rows/columns dropped
    g = torch.randn(2, 16, 4, 4, dtype=dtype)
    ref = conv(x)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    out = fast(x)
    (grad,) = torch.autograd.grad(out, x, g)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=atol)


def test_encoders_use_it_and_keep_their_keys_and_outputs(tmp_path):
    from guidance.encoders import features
    from guidance.patch_embedding import MatmulPatchEmbedding, use_matmul_patch_embedding
    from tiny import tiny_clip_model, tiny_encoder

    reference = tiny_clip_model(0)
    enc = tiny_encoder(0)
    assert isinstance(enc.model.vision_model.embeddings.patch_embedding, MatmulPatchEmbedding)
    assert enc.model.state_dict().keys() == reference.state_dict().keys()
    pixels = torch.rand(3, 3, 32, 32)
    expected = features(reference.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(enc._image_features(pixels), expected, rtol=0, atol=1e-5)
    strided = torch.nn.Sequential(torch.nn.Conv2d(3, 8, kernel_size=3, stride=2))    # a ResNet stem: kept
    assert not use_matmul_patch_embedding(strided, "0") and isinstance(strided[0], torch.nn.Conv2d)


def test_half_precision_clip_on_the_cpu_runs_eager_attention(tmp_path):
    from tiny import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "clip")
    half = load_encoder(str(folder), device="cpu", precision="bf16")
    full = load_encoder(str(folder), device="cpu", precision="fp32")
    assert half.model.config._attn_implementation == "eager" and full.model.config._attn_implementation == "sdpa"
    images = torch.rand(4, 3, 32, 32)
    cos = torch.nn.functional.cosine_similarity(half.encode_image(images), full.encode_image(images))
    assert (cos > 0.99).all()


def test_open_clip_vit_uses_it_with_the_same_outputs():
    open_clip = pytest.importorskip("open_clip")
    from guidance import OpenCLIPEncoder
    from guidance.patch_embedding import MatmulPatchEmbedding

    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8,
                                                               image_size=32),
                                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode_image(pixels)
    enc = OpenCLIPEncoder(model, None, name="open_clip:tiny")
    assert isinstance(enc.model.visual.conv1, MatmulPatchEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(enc._image_features(pixels), expected, rtol=0, atol=1e-5)
