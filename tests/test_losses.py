import math

import torch

from guidance import cosine_distance, range_loss, saturation_loss, spherical_distance, symmetry_loss, tv_loss


def test_spherical_distance_by_hand():
    x = torch.tensor([1.0, 0.0])
    y = torch.tensor([0.0, 3.0])                 # 90 degrees apart, length ignored
    # |x - y| = sqrt(2); 2 * arcsin(sqrt(2)/2)^2 = 2 * (pi/4)^2
    assert torch.allclose(spherical_distance(x, y), torch.tensor(2 * (math.pi / 4) ** 2))
    assert spherical_distance(x, x).abs() < 1e-6
    assert torch.allclose(spherical_distance(x, -x), torch.tensor(math.pi ** 2 / 2))


def test_spherical_is_twice_squared_half_angle():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    angle = torch.arccos(torch.nn.functional.cosine_similarity(x, y, dim=-1))
    assert torch.allclose(spherical_distance(x, y), angle.pow(2) / 2, atol=1e-5)


def test_cosine_distance():
    assert torch.allclose(cosine_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])), torch.tensor(1.0))


def test_image_losses_shapes_and_values():
    flat = torch.full((2, 3, 8, 8), 0.5)
    assert torch.equal(tv_loss(flat), torch.zeros(2))
    assert torch.equal(range_loss(flat), torch.zeros(2))
    assert torch.equal(saturation_loss(flat), torch.zeros(2))
    assert torch.equal(symmetry_loss(flat), torch.zeros(2))
    over = torch.full((1, 3, 4, 4), 1.5)
    assert torch.allclose(range_loss(over), torch.tensor([0.25]))
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    assert torch.allclose(saturation_loss(red), torch.tensor([1.0]))
    half = torch.zeros(1, 3, 4, 4)
    half[..., :2] = 1.0
    assert torch.allclose(symmetry_loss(half), torch.tensor([1.0]))
    stripes = torch.zeros(1, 3, 4, 4)
    stripes[..., ::2] = 1.0
    assert torch.allclose(tv_loss(stripes), torch.tensor([1.0]))
