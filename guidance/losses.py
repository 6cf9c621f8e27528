"""Distances between embeddings and auxiliary image losses, as plain functions.

Embedding distances take ``[..., D]`` tensors and normalise them; image losses take
``[B, 3, H, W]`` images in ``[0, 1]`` and return one value per image, ``[B]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance ``2 * arcsin(|x̂ - ŷ| / 2)^2`` between unit vectors.

    The loss of Crowson's VQGAN-CLIP notebook (and k-diffusion's CLIP guidance): zero for
    equal directions, ``π²/2`` for opposite ones, with gradients that stay useful near
    both ends, unlike ``1 - cos``.
    """
    x = F.normalize(x.float(), dim=-1)
    y = F.normalize(y.float(), dim=-1)
    return (x - y).norm(dim=-1).div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x, y)``."""
    return 1 - F.cosine_similarity(x.float(), y.float(), dim=-1)


DISTANCES = {"spherical": spherical_distance, "cosine": cosine_distance}


class _ClampWithGrad(torch.autograd.Function):
    """Clamp in the forward pass; in the backward pass let the gradient through except where it
    would push a clamped value further out of range (the ``ClampWithGrad`` of VQGAN+CLIP)."""

    @staticmethod
    def forward(ctx, x, low, high):
        ctx.low, ctx.high = low, high
        ctx.save_for_backward(x)
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        outside = x - x.clamp(ctx.low, ctx.high)
        # Gradient descent moves x by -grad: keep grad unless that move goes further outside.
        return grad * (grad * outside >= 0), None, None


def clamp_with_grad(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Differentiable clamp: values clamped, gradients kept unless they push further out of range.
    Objectives apply it to rendered images, which may overshoot ``[0, 1]`` a little."""
    return _ClampWithGrad.apply(x, low, high)


def tv_loss(images: torch.Tensor) -> torch.Tensor:
    """Total variation: mean squared difference of neighbouring pixels (Disco Diffusion's ``tv_loss``)."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return dx.pow(2).flatten(1).mean(1) + dy.pow(2).flatten(1).mean(1)


def range_loss(images: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Mean squared amount by which pixels leave ``[low, high]`` (Disco Diffusion's ``range_loss``)."""
    return (images - images.clamp(low, high)).pow(2).flatten(1).mean(1)


def saturation_loss(images: torch.Tensor) -> torch.Tensor:
    """Mean chroma, ``max(rgb) - min(rgb)`` per pixel; a positive weight desaturates (as pixray's
    saturation loss), a negative one saturates."""
    chroma = images.amax(dim=1) - images.amin(dim=1)
    return chroma.flatten(1).mean(1)


def symmetry_loss(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the image and its left-right mirror (pixray's symmetry loss)."""
    return (images - images.flip(-1)).pow(2).flatten(1).mean(1)


IMAGE_LOSSES = {"tv": tv_loss, "range": range_loss, "saturation": saturation_loss, "symmetry": symmetry_loss}
