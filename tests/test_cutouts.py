import pytest
import torch

from guidance import Cutouts, augmentation_names, build_augmentations


def _image(h=48, w=64, seed=0):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_range():
    cut = Cutouts(8, num_overview=2, cut_pow=1.5, min_fraction=0.3)
    out = cut(_image(), 24, generator=torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 24, 24)
    assert out.min() >= -0.2 and out.max() <= 1.2   # noise-free augs stay near [0,1]


def test_no_augmentation_values_stay_in_range():
    out = Cutouts(6, min_fraction=0.2, augmentations=[])(_image(), 16, generator=torch.Generator().manual_seed(1))
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_overview_cut_is_whole_image():
    img = _image(32, 32)
    out = Cutouts(1, num_overview=1, augmentations=[])(img, 16, generator=torch.Generator().manual_seed(0))
    pooled = torch.nn.functional.avg_pool2d(img, 2)          # 32 -> 16 area average
    assert torch.allclose(out, pooled, atol=1e-5)


def test_seed_reproduces_and_differs():
    img = _image()
    cut = Cutouts(8, min_fraction=0.3, augmentations=["affine:1", "perspective:1", "jitter:1", "erasing:0.5", "noise:1"])
    a = cut(img, 16, generator=torch.Generator().manual_seed(3))
    b = cut(img, 16, generator=torch.Generator().manual_seed(3))
    c = cut(img, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Cutouts(4, augmentations=["affine:1", "noise:1"])(_image(), 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_cut_pow_controls_crop_size():
    small = Cutouts(400, cut_pow=4.0, min_fraction=0.1).boxes(64, 64, 16, 1, torch.Generator().manual_seed(0))
    big = Cutouts(400, cut_pow=0.25, min_fraction=0.1).boxes(64, 64, 16, 1, torch.Generator().manual_seed(0))
    side = lambda b: (b[:, 3] - b[:, 1]).mean()
    assert side(small) < side(big)
    assert (small[:, 1:] >= 0).all() and (small[:, 3] <= 64).all()


def test_gradcheck_float64_all_augmentations():
    names = ["affine:1", "perspective:1", "jitter:1", "hflip:1", "sharpness:1", "rotation:1", "blur:1", "noise:1"]
    cut = Cutouts(3, num_overview=1, min_fraction=0.4, augmentations=names).double()
    img = torch.rand(1, 3, 12, 12, dtype=torch.float64, requires_grad=True)

    def f(x):
        return cut(x, 6, generator=torch.Generator().manual_seed(5))

    # fast_mode checks the Jacobian along random directions: the same test, a few evaluations
    # instead of one per input element.
    assert torch.autograd.gradcheck(f, (img,), eps=1e-6, atol=1e-4, fast_mode=True)


def test_gradient_reaches_input_through_every_named_augmentation():
    for name in augmentation_names():
        img = torch.rand(1, 3, 20, 20, requires_grad=True)
        Cutouts(2, augmentations=[f"{name}:1"])(img, 8, generator=torch.Generator().manual_seed(0)).sum().backward()
        assert img.grad is not None and img.grad.abs().sum() > 0, name


def test_aliases_and_errors():
    assert len(build_augmentations(["Af", "Pe", "Ji", "Er"])) == 4
    mods = build_augmentations({"affine": 0.25})
    assert mods[0].p == 0.25
    with pytest.raises(ValueError, match="unknown augmentation 'swirl'"):
        build_augmentations(["swirl"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        build_augmentations(["affine:2"])
    with pytest.raises(ValueError, match="at least 1"):
        Cutouts(0)
