"""Augmented cutouts: many CLIP-sized views of one rendered image, in one batched call.

Crops are square boxes cut by ``torchvision.ops.roi_align`` with adaptive sampling, which
averages every source pixel under an output pixel (an antialiased, differentiable resize)
for all cutouts at once. Sizes follow VQGAN-CLIP's ``cut_pow`` rule; ``num_overview``
boxes cover the whole image (padded to a square), as Disco Diffusion's overview cuts do.
The cut batch then goes through kornia augmentations chosen by name, each with an
explicit probability ``p``. All randomness comes from the ``torch.Generator`` passed in:
kornia draws from torch's global RNG, so it runs inside ``torch.random.fork_rng`` seeded
from that generator, leaving the global state untouched.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

# name -> (factory taking p, default p). Defaults follow nerdyrodent's VQGAN-CLIP settings.
_AUGMENTATIONS: dict[str, tuple[Callable[[float], nn.Module], float]] = {}
# Short names used by nerdyrodent's VQGAN-CLIP ``--augments``.
ALIASES = {"af": "affine", "pe": "perspective", "ji": "jitter", "er": "erasing", "hf": "hflip",
           "sh": "sharpness", "gn": "noise", "gr": "grayscale", "ro": "rotation", "bl": "blur",
           "ts": "thin_plate"}
DEFAULT_AUGMENTATIONS = ("affine", "perspective", "jitter", "erasing")


def _register() -> None:
    import kornia.augmentation as K

    _AUGMENTATIONS.update({
        "affine": (lambda p: K.RandomAffine(degrees=15, translate=(0.1, 0.1), shear=5,
                                            padding_mode="border", p=p), 0.7),
        "perspective": (lambda p: K.RandomPerspective(distortion_scale=0.4, p=p), 0.7),
        "jitter": (lambda p: K.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.05, hue=0.01, p=p), 0.7),
        "erasing": (lambda p: K.RandomErasing(scale=(0.1, 0.4), ratio=(0.3, 1 / 0.3), p=p), 0.7),
        "hflip": (lambda p: K.RandomHorizontalFlip(p=p), 0.5),
        "sharpness": (lambda p: K.RandomSharpness(sharpness=0.3, p=p), 0.5),
        "noise": (lambda p: K.RandomGaussianNoise(mean=0.0, std=0.05, p=p), 0.5),
        "grayscale": (lambda p: K.RandomGrayscale(p=p), 0.1),
        "rotation": (lambda p: K.RandomRotation(degrees=15, p=p), 0.5),
        "blur": (lambda p: K.RandomGaussianBlur(kernel_size=(5, 5), sigma=(0.1, 1.5), p=p), 0.3),
        "thin_plate": (lambda p: K.RandomThinPlateSpline(scale=0.1, p=p), 0.3),
    })


def augmentation_names() -> list[str]:
    if not _AUGMENTATIONS:
        _register()
    return sorted(_AUGMENTATIONS)


def build_augmentations(spec: Iterable[str | tuple[str, float]] | Mapping[str, float] | None) -> nn.Module:
    """A kornia ``ImageSequential`` of augmentations from names: ``["affine", "jitter:0.3", ("erasing", 0.5)]`` or ``{"affine": 0.7}``.

    Short names (``Af Pe Ji Er Hf Sh Gn Gr Ro Bl Ts``) are accepted.
    """
    if not _AUGMENTATIONS:
        _register()
    items = list(spec.items()) if isinstance(spec, Mapping) else list(spec or [])
    modules = []
    for item in items:
        if isinstance(item, str):
            name, _, p_text = item.partition(":")
            p = None
            if p_text:
                try:
                    p = float(p_text)
                except ValueError:
                    raise ValueError(f"augmentation {item!r}: probability {p_text!r} is not a number") from None
        else:
            name, p = item
        key = ALIASES.get(name.strip().lower(), name.strip().lower())
        if key not in _AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(augmentation_names())} "
                             f"(or {' '.join(k.title() for k in ALIASES)})")
        factory, default_p = _AUGMENTATIONS[key]
        p = default_p if p is None else float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation {name!r}: probability {p} must be between 0 and 1")
        modules.append(factory(p))
    import kornia.augmentation as K

    return K.ImageSequential(*modules)


class Cutouts(nn.Module):
    """``Cutouts(n)(images, size, generator=g)`` -> ``[n*B, 3, size, size]``, cutout-major.

    Args:
        num_cutouts: views per image, overview cuts included.
        cut_pow: exponent on the uniform draw of the crop size; >1 favours small crops.
        num_overview: how many of the views show the whole image.
        min_fraction: smallest crop side as a fraction of the image's short side. ``None``
            uses VQGAN-CLIP's rule (no smaller than the model's input size).
        augmentations: names for :func:`build_augmentations`.
    """

    def __init__(self, num_cutouts: int = 32, *, cut_pow: float = 1.0, num_overview: int = 0,
                 min_fraction: float | None = None,
                 augmentations: Sequence[str | tuple[str, float]] | Mapping[str, float] | None = DEFAULT_AUGMENTATIONS):
        super().__init__()
        if num_cutouts < 1:
            raise ValueError(f"num_cutouts is {num_cutouts}; it must be at least 1")
        if not 0 <= num_overview <= num_cutouts:
            raise ValueError(f"num_overview {num_overview} must be between 0 and num_cutouts ({num_cutouts})")
        if cut_pow <= 0:
            raise ValueError(f"cut_pow is {cut_pow}; it must be positive (1.0 is uniform)")
        if min_fraction is not None and not 0 < min_fraction <= 1:
            raise ValueError(f"min_fraction is {min_fraction}; it must be in (0, 1]")
        self.num_cutouts = num_cutouts
        self.cut_pow = cut_pow
        self.num_overview = num_overview
        self.min_fraction = min_fraction
        self.augs = build_augmentations(augmentations)

    def boxes(self, height: int, width: int, size: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``[n*B, 5]`` roi boxes ``(batch_index, x1, y1, x2, y2)``, cutout-major."""
        n, n_over = self.num_cutouts, self.num_overview
        short = min(height, width)
        lo = short * self.min_fraction if self.min_fraction is not None else min(short, size)
        u = torch.rand(n - n_over, batch, 3, generator=generator, device=generator.device).cpu()
        side = (u[..., 0] ** self.cut_pow) * (short - lo) + lo
        x1 = u[..., 1] * (width - side)
        y1 = u[..., 2] * (height - side)
        inner = torch.stack([x1, y1, x1 + side, y1 + side], dim=-1)
        big = float(max(height, width))
        over_box = torch.tensor([(width - big) / 2, (height - big) / 2, (width + big) / 2, (height + big) / 2])
        over = over_box.expand(n_over, batch, 4)
        boxes = torch.cat([over, inner], dim=0)                                  # [n, B, 4]
        index = torch.arange(batch, dtype=boxes.dtype).expand(n, batch).unsqueeze(-1)
        return torch.cat([index, boxes], dim=-1).reshape(n * batch, 5)

    def forward(self, images: torch.Tensor, size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        from torchvision.ops import roi_align

        from .runtime import to_device

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
        if generator is None:
            generator = torch.default_generator
        batch, _, height, width = images.shape
        boxes = to_device(self.boxes(height, width, size, batch, generator), images.device, images.dtype)
        cuts = roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if len(self.augs):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            cuda = images.device.type == "cuda"
            with torch.random.fork_rng(devices=[images.device] if cuda else []):
                torch.default_generator.manual_seed(seed)
                if cuda:
                    with torch.cuda.device(images.device):
                        torch.cuda.manual_seed(seed)
                cuts = self.augs(cuts)
        return cuts
