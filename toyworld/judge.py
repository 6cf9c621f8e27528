"""A pixel-level judge for toy-world images, independent of any CLIP.

Given an image it recovers (background colour, shape colour, shape name):

1. a 3x3 per-channel median filter removes pixel noise;
2. every pixel is quantised to the nearest palette colour;
3. the background is the most common colour on the image border;
4. the foreground is every non-background pixel, cleaned by a 3x3 majority filter and reduced
   to its largest connected component;
5. the shape colour is the most common palette colour inside that component;
6. the shape is the one whose ideal mask -- with the component's area and centroid -- overlaps
   the component best (intersection over union).

It accepts a torch tensor ``[3, H, W]`` (or a batch ``[N, 3, H, W]``) with values in [0, 1], a
PIL image, or a uint8 array ``[H, W, 3]``. Images of another size are resized to 64x64 first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .world import CENTROID_OFFSET, COLOURS, FILL_FRACTION, PALETTE, RESOLUTION, SHAPES, shape_mask

_PALETTE = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255.0  # [8, 3]
_BORDER = 3  # pixels of the border ring used to find the background


@dataclass(frozen=True)
class Judgement:
    background: str
    colour: str | None  # None when no foreground was found
    shape: str | None
    shape_score: float  # IoU of the foreground with the best ideal shape (0 when no foreground)
    foreground_fraction: float  # share of the canvas covered by the foreground component

    def as_dict(self) -> dict:
        return {
            "background": self.background,
            "colour": self.colour,
            "shape": self.shape,
            "shape_score": self.shape_score,
            "foreground_fraction": self.foreground_fraction,
        }


def to_batch(images) -> torch.Tensor:
    """Any accepted image form -> float tensor ``[N, 3, 64, 64]`` in [0, 1] on the CPU."""
    if isinstance(images, (list, tuple)):
        return torch.cat([to_batch(im) for im in images])
    if not isinstance(images, (torch.Tensor, np.ndarray)):  # PIL image
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            arr = arr[None]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
        if arr.dtype == np.uint8:
            t = t / 255.0
    else:
        t = images.detach().float().cpu()
        if t.ndim == 3:
            t = t[None]
    if t.shape[1] != 3:
        raise ValueError(f"expected RGB images with 3 channels first, got shape {tuple(t.shape)}")
    t = t.clamp(0, 1)
    if t.shape[-2:] != (RESOLUTION, RESOLUTION):
        t = F.interpolate(t, size=(RESOLUTION, RESOLUTION), mode="area" if t.shape[-1] > RESOLUTION else "bilinear")
    return t


def _median3(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)  # [N, C*9, H*W]
    return patches.view(n, c, 9, h * w).median(dim=2).values.view(n, c, h, w)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Nearest palette index of every pixel: ``[N, 3, H, W]`` -> long ``[N, H, W]``."""
    d = ((images[:, None] - _PALETTE[None, :, :, None, None]) ** 2).sum(2)  # [N, 8, H, W]
    return d.argmin(1)


def _mode(labels: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[int, float]:
    counts = torch.bincount(labels.flatten(), weights=None if weights is None else weights.flatten().float(), minlength=len(COLOURS))
    return int(counts.argmax()), float(counts.max())


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Largest 8-connected component of a boolean ``[H, W]`` mask (label propagation)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)
    m = mask.view(1, 1, h, w).float()
    lab = ids * m
    for _ in range(4 * (h + w)):
        new = F.max_pool2d(lab, 3, stride=1, padding=1) * m
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab.view(-1).long()
    counts = torch.bincount(lab, minlength=h * w + 1)
    counts[0] = 0
    return (lab == counts.argmax()).view(h, w)


_GRID_CACHE: dict = {}


def _shape_scores(mask: torch.Tensor) -> dict[str, float]:
    """IoU of ``mask`` with each ideal shape of the same area and centroid."""
    h, w = mask.shape
    area = float(mask.sum())
    ys, xs = torch.nonzero(mask, as_tuple=True)
    # centroid in canvas fractions (pixel centres at (i + 0.5) / res)
    cx = (xs.float().mean().item() + 0.5) / w
    cy = (ys.float().mean().item() + 0.5) / h
    frac_area = area / (h * w)
    scores = {}
    m = mask.numpy()
    for name in SHAPES:
        best = 0.0
        for scale in (0.92, 1.0, 1.08):
            s = scale * float(np.sqrt(frac_area / FILL_FRACTION[name]))
            ideal = shape_mask(name, s, (cx, cy - CENTROID_OFFSET[name] * s), resolution=h)
            inter = np.logical_and(ideal, m).sum()
            union = np.logical_or(ideal, m).sum()
            best = max(best, float(inter / max(union, 1)))
        scores[name] = best
    return scores


def judge_batch(images) -> list[Judgement]:
    """Judge a batch of images (see module docstring for the accepted forms)."""
    x = to_batch(images)
    labels = quantise(_median3(x))  # [N, H, W]
    n, h, w = labels.shape
    border = torch.zeros(h, w, dtype=torch.bool)
    border[:_BORDER] = border[-_BORDER:] = True
    border[:, :_BORDER] = border[:, -_BORDER:] = True
    out = []
    for i in range(n):
        lab = labels[i]
        bg, _ = _mode(lab[border])
        fg = (lab != bg).float()[None, None]
        fg = F.avg_pool2d(F.pad(fg, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0] > 0.5
        comp = _largest_component(fg)
        area = int(comp.sum())
        if area < 4:
            out.append(Judgement(COLOURS[bg], None, None, 0.0, area / (h * w)))
            continue
        colours_in = lab[comp]
        colours_in = colours_in[colours_in != bg]
        colour = _mode(colours_in)[0] if colours_in.numel() else None
        scores = _shape_scores(comp)
        shape = max(scores, key=scores.get)
        out.append(
            Judgement(
                background=COLOURS[bg],
                colour=None if colour is None else COLOURS[colour],
                shape=shape,
                shape_score=scores[shape],
                foreground_fraction=area / (h * w),
            )
        )
    return out


def judge(image) -> Judgement:
    """Judge a single image: tensor ``[3, H, W]`` in [0, 1], PIL image or uint8 ``[H, W, 3]``."""
    results = judge_batch(image)
    if len(results) != 1:
        raise ValueError(f"judge() takes one image, got {len(results)}; use judge_batch()")
    return results[0]


def accuracy(
    judgements: Sequence[Judgement],
    colours: Iterable[str],
    shapes: Iterable[str],
    backgrounds: Iterable[str],
) -> dict[str, float]:
    """Per-attribute and all-correct accuracy of judgements against the intended attributes."""
    colours, shapes, backgrounds = list(colours), list(shapes), list(backgrounds)
    n = len(judgements)
    c = sum(j.colour == t for j, t in zip(judgements, colours)) / n
    s = sum(j.shape == t for j, t in zip(judgements, shapes)) / n
    b = sum(j.background == t for j, t in zip(judgements, backgrounds)) / n
    a = (
        sum(
            j.colour == tc and j.shape == ts and j.background == tb
            for j, tc, ts, tb in zip(judgements, colours, shapes, backgrounds)
        )
        / n
    )
    return {"colour": c, "shape": s, "background": b, "all": a}
