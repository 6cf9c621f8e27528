import pytest
import torch

from guidance import CLIPLoss, Cutouts, PromptSchedule, spherical_distance
from tiny import tiny_encoder


def _loss(encoder, prompts="a red circle", **kw):
    return CLIPLoss(encoder, prompts, cutouts=Cutouts(4, min_fraction=0.5, augmentations=["affine:0.5"]), **kw)


def test_gradient_reaches_input_and_parts(encoder):
    fn = _loss(encoder, "a red circle:1|a blue square:-0.5")
    img = torch.rand(2, 3, 40, 40, requires_grad=True)
    out = fn(img)
    out.total.backward()
    assert img.grad.abs().sum() > 0
    assert out.per_image.shape == (2,)
    assert set(out.parts) == {"a red circle", "a blue square"}
    assert torch.allclose(out.total, out.per_image.sum())
    assert torch.allclose(sum(out.parts.values()), out.per_image.detach())


def test_value_matches_hand_computation(encoder):
    fn = CLIPLoss(encoder, "a red circle:2", cutouts=Cutouts(1, num_overview=1, augmentations=[]))
    img = torch.rand(1, 3, 32, 32)
    expected = 2 * spherical_distance(encoder.encode_image(img), encoder.encode_text(["a red circle"]))
    assert torch.allclose(fn(img).total, expected.sum(), atol=1e-5)


def test_negative_weight_pushes_away(encoder):
    img = torch.rand(1, 3, 32, 32)
    pos = CLIPLoss(encoder, "a red circle:1", cutouts=Cutouts(1, num_overview=1, augmentations=[]))(img)
    neg = CLIPLoss(encoder, "a red circle:-1", cutouts=Cutouts(1, num_overview=1, augmentations=[]))(img)
    assert torch.allclose(neg.total, -pos.total)


def test_optimiser_lowers_loss(encoder):
    fn = _loss(encoder, "a yellow triangle on a purple background")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = torch.optim.Adam([pixels], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(30):
        opt.zero_grad()
        out = fn(pixels, generator=gen)
        out.total.backward()
        opt.step()
        first = first if first is not None else out.total.item()
    final = fn(pixels, generator=torch.Generator().manual_seed(0)).total.item()
    assert final < first - 0.05


def test_stop_threshold_stops_gradient(encoder):
    img = torch.rand(1, 3, 32, 32, requires_grad=True)
    CLIPLoss(encoder, "a fox:1:10", cutouts=Cutouts(1, num_overview=1, augmentations=[]))(img).total.backward()
    assert img.grad is None or img.grad.abs().sum() == 0


def test_a_prompt_stops_pulling_once_it_crosses_its_threshold_mid_run(encoder):
    """Above its stop value a prompt pulls; once the optimisation takes it below, its gradient is zero."""
    cuts = Cutouts(1, num_overview=1, augmentations=[])
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    start = float(CLIPLoss(encoder, "a fox", cutouts=cuts)(pixels).total)
    fn = CLIPLoss(encoder, f"a fox:1:{start - 0.02}", cutouts=cuts)
    opt = torch.optim.SGD([pixels], lr=2.0)
    phases = []
    for _ in range(40):
        opt.zero_grad()
        out = fn(pixels)
        out.total.backward()
        pulling = float(out.total) >= start - 0.02
        assert (pixels.grad.abs().sum() > 0) == pulling
        phases.append(pulling)
        opt.step()
    assert phases[0] and not phases[-1]              # it crossed its threshold during the run


def test_embeddings_cached_not_recomputed(encoder, monkeypatch):
    fn = _loss(encoder, "a red circle|a fox:-1")
    calls = []
    monkeypatch.setattr(encoder, "encode_text", lambda texts: calls.append(texts))
    fn(torch.rand(1, 3, 32, 32))
    fn(torch.rand(1, 3, 32, 32))
    assert calls == []


def test_schedule_changes_targets(encoder):
    fn = _loss(encoder, PromptSchedule({0: "a red circle", 10: "a blue square"}))
    assert list(fn(torch.rand(1, 3, 32, 32), step=3).parts) == ["a red circle"]
    assert list(fn(torch.rand(1, 3, 32, 32), step=10).parts) == ["a blue square"]


def test_image_and_noise_prompts(encoder, tmp_path):
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(path)
    from guidance import Prompt
    fn = _loss(encoder, [Prompt(str(path), 1.0, kind="image"), Prompt("7", 0.5, kind="noise")])
    out = fn(torch.rand(1, 3, 32, 32))
    assert set(out.parts) == {f"image:{path}", "noise:7"}


def test_ensemble_weights_and_sizes(encoder):
    other = tiny_encoder(seed=1, image_size=16)
    img = torch.rand(1, 3, 32, 32)
    cuts = Cutouts(1, num_overview=1, augmentations=[])
    a = CLIPLoss(encoder, "a fox", cutouts=cuts)(img).total
    b = CLIPLoss(other, "a fox", cutouts=cuts)(img).total
    both = CLIPLoss([encoder, other], "a fox", cutouts=cuts, encoder_weights=[1.0, 0.5])(img).total
    assert torch.allclose(both, a + 0.5 * b, atol=1e-5)


def test_image_losses_added(encoder):
    img = torch.rand(1, 3, 32, 32)
    cuts = Cutouts(1, num_overview=1, augmentations=[])
    base = CLIPLoss(encoder, "a fox", cutouts=cuts)(img)
    extra = CLIPLoss(encoder, "a fox", cutouts=cuts, image_losses={"tv": 2.0, "symmetry": 1.0})(img)
    assert {"tv", "symmetry"} <= set(extra.parts)
    assert torch.allclose(extra.total, base.total + extra.parts["tv"].sum() + extra.parts["symmetry"].sum())


def test_seed_reproduces(encoder):
    img = torch.rand(1, 3, 32, 32)
    a = _loss(encoder, seed=3)(img).total
    b = _loss(encoder, seed=3)(img).total
    assert torch.equal(a, b)


def test_errors(encoder):
    with pytest.raises(ValueError, match="empty prompt"):
        CLIPLoss(encoder, "")
    with pytest.raises(ValueError, match="one per encoder"):
        CLIPLoss(encoder, "a", encoder_weights=[1, 2])
    with pytest.raises(ValueError, match="unknown image loss"):
        CLIPLoss(encoder, "a", image_losses={"blur": 1})
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        CLIPLoss(encoder, "a")(torch.rand(3, 32, 32))
