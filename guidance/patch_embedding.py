"""A ViT's patch embedding (a convolution whose kernel equals its stride) computed as one matrix product.

The convolution and the product are the same sum, but on the CPU oneDNN's backward of a 32x32-stride-32
convolution (the input gradient that every CLIP-guided step needs) is an order of magnitude slower than the
product's (docs/benchmarks.md, "Measurements behind code choices"). So the CLIP
image towers swap it in (:func:`use_matmul_patch_embedding`): the module keeps the convolution's own weight
and bias parameters, so state-dict keys, ``--compile`` and dtype changes are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MatmulPatchEmbedding(nn.Module):
    """``nn.Conv2d(C, D, kernel_size=p, stride=p)`` (no padding, dilation or groups) as ``patches @ W.T``;
    the output ``[B, D, H // p, W // p]`` as the convolution's (trailing rows/columns dropped as it does)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not can_replace(conv):
            raise ValueError(f"{conv} is not a patch embedding (kernel == stride, no padding, dilation or groups)")
        self.weight = conv.weight            # the same parameters: state-dict keys and dtype follow the model
        self.bias = conv.bias
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (b, c, h, w) = self.kernel_size, x.shape
        gh, gw = h // ph, w // pw
        x = x[..., :gh * ph, :gw * pw]
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.reshape(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size} (as a matrix product)"


def can_replace(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


def use_matmul_patch_embedding(parent: nn.Module, name: str) -> bool:
    """Replace ``parent.<name>`` (a patch-embedding convolution) by :class:`MatmulPatchEmbedding`; ``False``
    (nothing changed) when it is not one."""
    conv = getattr(parent, name, None)
    if conv is None or not can_replace(conv):
        return False
    setattr(parent, name, MatmulPatchEmbedding(conv))
    return True
