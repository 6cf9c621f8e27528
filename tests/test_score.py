"""guidance.score: CLIP score vs torchmetrics 1.9, the three definitions, inputs, batching."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from guidance.score import (HESSEL_PREFIX, CLIPScore, ScoreModel, TorchmetricsCLIP, as_image_list, clip_score, get_score_model,
                            image_similarity, pair_scores, reduce_scores)
from tiny import save_tiny_clip

CAPTIONS = ["a red circle", "a blue square on green", "a red circle", "a yellow cross", "purple", "a blue square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0, image_size=32)


@pytest.fixture(scope="module")
def model(clip_dir):
    return ScoreModel.load(str(clip_dir), device="cpu")


def _images(n=6, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def _torchmetrics(clip_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore as TMCLIPScore
    from transformers import CLIPModel, CLIPProcessor

    return TMCLIPScore(model_name_or_path=lambda: (TorchmetricsCLIP(CLIPModel.from_pretrained(clip_dir)),
                                                   CLIPProcessor.from_pretrained(clip_dir)))


def _torchmetrics_pairs(metric, source, target):
    """torchmetrics' own per-pair 100*cos (the quantity its update sums)."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    with torch.no_grad():
        return _clip_score_update(source, target, metric.model, metric.processor)[0].double()


def test_equals_torchmetrics_on_uint8_images(clip_dir, model):
    images = _images()
    tm = _torchmetrics(clip_dir)
    tm.update(images[:4], CAPTIONS[:4])
    tm.update(images[4:], CAPTIONS[4:])
    ref_pairs = _torchmetrics_pairs(tm, images, CAPTIONS)
    ours = clip_score(images, CAPTIONS, model=model, reduction="none")
    assert ours.shape == (6,)
    assert torch.allclose(ours.double(), ref_pairs, atol=1e-4)
    assert abs(float(clip_score(images, CAPTIONS, model=model)) - float(tm.compute())) < 1e-4
    assert (ref_pairs < 0).any() and (ref_pairs > 0).any()  # the case where the definitions disagree


def test_float_images_match_torchmetrics_both_ways(clip_dir, model):
    x = torch.rand(4, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    tm = _torchmetrics(clip_dir)
    # quantize=True (default): scored as the 8-bit image saving would give
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(clip_score(x, CAPTIONS[:4], model=model, reduction="none").double(),
                          _torchmetrics_pairs(tm, as_uint8, CAPTIONS[:4]), atol=1e-4)
    # quantize=False: resized in float, like torchmetrics given float pixels in 0..255
    assert torch.allclose(clip_score(x, CAPTIONS[:4], model=model, reduction="none", quantize=False).double(),
                          _torchmetrics_pairs(tm, x * 255, CAPTIONS[:4]), atol=1e-4)


def test_image_similarity_matches_torchmetrics(clip_dir, model):
    a, b = _images(3, seed=2), _images(3, seed=3)
    tm = _torchmetrics(clip_dir)
    ours = image_similarity(a, b, model=model, reduction="none").double()
    assert torch.allclose(ours, _torchmetrics_pairs(tm, a, b), atol=1e-4)
    same = image_similarity(a, a[1], model=model, reduction="none")  # one reference for all
    assert abs(float(same[1]) - 100.0) < 1e-3 and float(same[0]) < 100.0 - 1e-3


def test_accumulation_equals_one_shot_and_forward_runs_once(model):
    images = _images(7, seed=4)
    caps = (CAPTIONS * 2)[:7]
    one_shot = clip_score(images, caps, model=model)
    small_batches = clip_score(images, caps, model=model, batch_size=2)
    assert abs(float(one_shot) - float(small_batches)) < 1e-4

    calls = []
    hook = model.encoder.model.vision_model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        metric = CLIPScore(model)
        batch_value = metric(images[:3], caps[:3])
        metric.update(images[3:5], caps[3:5])
        metric.update(images[5:], caps[5:])
    finally:
        hook.remove()
    assert len(calls) == 3  # one vision pass per batch; torchmetrics' forward makes two
    assert not batch_value.requires_grad and batch_value.grad_fn is None
    assert abs(float(batch_value) - float(clip_score(images[:3], caps[:3], model=model))) < 1e-4
    assert abs(float(metric.compute()) - float(one_shot)) < 1e-4
    assert metric.count == 7
    metric.reset()
    with pytest.raises(ValueError, match="no image-caption pairs"):
        metric.compute()


def test_each_unique_caption_is_encoded_once(model):
    model.clear_cache()
    seen = []
    hook = model.encoder.model.text_model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        model.text_features(["x1", "x2", "x1", "x2", "x1"])
        model.text_features(["x2", "x3"])
    finally:
        hook.remove()
    assert seen == [2, 1]


def test_definitions_by_hand():
    cos = torch.tensor([0.3, -0.5], dtype=torch.float64)
    assert pair_scores(cos, "torchmetrics").tolist() == pytest.approx([30.0, -50.0])
    assert pair_scores(cos, "per_pair").tolist() == pytest.approx([30.0, 0.0])
    assert pair_scores(cos, "hessel").tolist() == pytest.approx([0.75, 0.0])
    assert float(reduce_scores(-20.0, 2, "torchmetrics")) == 0.0  # clamps the mean ...
    assert float(reduce_scores(30.0, 2, "per_pair")) == pytest.approx(15.0)  # ... not each pair
    with pytest.raises(ValueError, match="unknown CLIP-score definition"):
        pair_scores(cos, "clipscore")


def test_per_pair_and_torchmetrics_differ_when_a_cosine_is_negative(model):
    images = _images()
    raw = clip_score(images, CAPTIONS, model=model, reduction="none")
    neg = raw < 0
    assert neg.any()
    per_pair = clip_score(images, CAPTIONS, model=model, definition="per_pair", reduction="none")
    assert torch.allclose(per_pair, raw.clamp_min(0), atol=1e-5)
    tm_mean = clip_score(images, CAPTIONS, model=model)
    pp_mean = clip_score(images, CAPTIONS, model=model, definition="per_pair")
    assert float(tm_mean) == pytest.approx(max(float(raw.mean()), 0.0), abs=1e-4)
    assert float(pp_mean) == pytest.approx(float(raw.clamp_min(0).mean()), abs=1e-4)
    assert float(pp_mean) > float(tm_mean) + 1.0
    only_negative = clip_score(images[neg], [c for c, n in zip(CAPTIONS, neg) if n], model=model)
    assert float(only_negative) == 0.0


def test_hessel_matches_hand_computation(clip_dir, model):
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir)
    images = _images(3, seed=5)
    caps = CAPTIONS[:3]
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=proc(images=list(images), return_tensors="pt")["pixel_values"])
        txt_in = proc(text=[HESSEL_PREFIX + c for c in caps], return_tensors="pt", padding=True)
        txt = clip.get_text_features(input_ids=txt_in["input_ids"], attention_mask=txt_in["attention_mask"])
    img, txt = img.pooler_output, txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    expected = 2.5 * cos.clamp_min(0)
    ours = clip_score(images, caps, model=model, definition="hessel", prefix=HESSEL_PREFIX, reduction="none")
    assert torch.allclose(ours, expected, atol=1e-5)
    mean = clip_score(images, caps, model=model, definition="hessel", prefix=HESSEL_PREFIX)
    assert float(mean) == pytest.approx(float(expected.mean()), abs=1e-5)


def test_every_input_form_gives_the_same_score(tmp_path, model):
    x = _images(1, seed=6)[0]
    path = tmp_path / "im.png"
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)
    ref = float(clip_score(x, "a red circle", model=model))
    for form in (str(path), path, Image.open(path), x.unsqueeze(0), [x], x.float() / 255, [path],
                 x.to(torch.int64)):
        assert float(clip_score(form, "a red circle", model=model)) == pytest.approx(ref, abs=1e-5)
    rgba = Image.open(path).convert("RGBA")  # converted to RGB like the processor does
    assert float(clip_score(rgba, ["a red circle"], model=model)) == pytest.approx(ref, abs=1e-5)


def test_one_prompt_broadcasts_and_several_models_return_a_dict(model, tmp_path):
    other = ScoreModel.load(str(save_tiny_clip(tmp_path / "b", seed=1)))
    images = _images(3, seed=7)
    one = clip_score(images, ["a red circle"], model=model, reduction="none")
    assert one.shape == (3,)
    assert torch.allclose(one, clip_score(images, ["a red circle"] * 3, model=model, reduction="none"))
    both = clip_score(images, "a red circle", model=[model, other], reduction="none")
    assert set(both) == {model.name, other.name}
    assert torch.allclose(both[model.name], one)
    assert not torch.allclose(both[other.name], one)
    metric = CLIPScore([model, other])
    metric.update(images, "a red circle")
    assert set(metric.compute()) == {model.name, other.name}


def test_model_by_name_is_loaded_once(clip_dir):
    a = get_score_model(str(clip_dir), device="cpu")
    assert get_score_model(str(clip_dir), device="cpu") is a
    by_name = clip_score(_images(2), "x", model=str(clip_dir), device="cpu", reduction="none")
    torch.testing.assert_close(by_name, clip_score(_images(2), "x", model=a, reduction="none"), rtol=0, atol=0)


def test_pil_backend_is_close_to_the_tensor_backend(clip_dir, model):
    pil = ScoreModel.load(str(clip_dir), image_backend="pil")
    assert pil.image_backend == "pil" and model.image_backend == "torchvision"
    images = _images(6, h=64, w=80, seed=8)
    a = clip_score(images, CAPTIONS, model=model, reduction="none")
    b = clip_score(images, CAPTIONS, model=pil, reduction="none")
    assert (a - b).abs().max() < 0.05  # one 8-bit level of resize rounding apart
    with pytest.raises(ValueError, match="image_backend"):
        ScoreModel.load(str(clip_dir), image_backend="opencv")


def test_long_prompt_warns_names_it_and_keeps_the_end_token(model):
    long_a = "a red circle " + "on a very large plain " * 30 + "at noon"
    long_b = "a red circle " + "on a very large plain " * 30 + "at midnight under the stars"
    model.clear_cache()
    with pytest.warns(UserWarning, match="a red circle on a very"):
        a = clip_score(_images(1), long_a, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = clip_score(_images(1), long_b, model=model)
        short = clip_score(_images(1), "a red circle", model=model)
    assert float(a) == pytest.approx(float(b), abs=1e-5)  # only the first 77 tokens count
    assert float(a) != pytest.approx(float(short), abs=1e-3)


@pytest.mark.parametrize("bad, match", [
    (torch.full((1, 3, 8, 8), 200.0), "8-bit range"),
    (torch.full((1, 3, 8, 8), -0.5), r"\[0, 1\]"),
    (torch.rand(1, 8, 8, 3), "permute"),
    (torch.rand(2, 1, 8, 8), r"\[B, 3, H, W\]"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    (torch.full((1, 3, 8, 8), 300, dtype=torch.int32), r"\[0, 255\]"),
    ([], "empty"),
    (42, "must be a tensor"),
])
def test_bad_images_give_clear_errors(model, bad, match):
    with pytest.raises(ValueError, match=match):
        clip_score(bad, "a red circle", model=model)


def test_bad_arguments_give_clear_errors(model, tmp_path):
    images = _images(3)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_score(images, ["a", "b"], model=model)
    with pytest.raises(ValueError, match="definition"):
        clip_score(images, "a", model=model, definition="mean")
    with pytest.raises(ValueError, match="reduction"):
        clip_score(images, "a", model=model, reduction="sum")
    with pytest.raises(ValueError, match="reference"):
        image_similarity(images, images[:2], model=model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_score(tmp_path / "nope.png", "a", model=model)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="not a readable image"):
        clip_score(tmp_path / "bad.png", "a", model=model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_score(images, "a", model=str(tmp_path / "no-such-clip"))
    with pytest.raises(ValueError, match="model must be"):
        clip_score(images, "a", model=3)


def test_as_image_list_shapes():
    out = as_image_list([torch.rand(2, 3, 5, 6), torch.zeros(3, 7, 7, dtype=torch.uint8)])
    assert [tuple(t.shape) for t in out] == [(3, 5, 6), (3, 5, 6), (3, 7, 7)]
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.uint8
