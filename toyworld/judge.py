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
        t = torch.from_numpy(np.array(arr, dtype=arr.dtype, copy=True)).permute(0, 3, 1, 2).float()
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


def _shift_sum(a: np.ndarray) -> np.ndarray:
    """3x3 box sum over the last two axes (edge-replicated)."""
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = a.shape[-2:]
    out = np.zeros(a.shape, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            out += p[..., dy : dy + h, dx : dx + w]
    return out


def _median3(x: np.ndarray) -> np.ndarray:
    """3x3 per-channel median filter of float images ``[N, 3, H, W]`` (edge-replicated)."""
    h, w = x.shape[-2:]
    p = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="edge")
    stack = np.stack([p[..., dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return np.median(stack, axis=0)


def quantise(images) -> np.ndarray:
    """Nearest palette index of every pixel: ``[N, 3, H, W]`` in [0, 1] -> int ``[N, H, W]``."""
    x = np.asarray(images, dtype=np.float32)
    pal = _PALETTE.numpy()
    d = ((x[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)  # [N, 8, H, W]
    return d.argmin(1)


def _largest_components(masks: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of each boolean mask ``[N, H, W]`` (label propagation)."""
    n, h, w = masks.shape
    ids = np.arange(1, h * w + 1, dtype=np.int32).reshape(1, h, w)
    lab = np.where(masks, ids, 0)
    for _ in range(2 * (h + w)):
        p = np.pad(lab, [(0, 0), (1, 1), (1, 1)])
        new = lab.copy()
        for dy in range(3):
            for dx in range(3):
                np.maximum(new, p[:, dy : dy + h, dx : dx + w], out=new)
        new *= masks
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.zeros_like(masks)
    for i in range(n):
        counts = np.bincount(lab[i].ravel(), minlength=2)
        counts[0] = 0
        if counts.max() > 0:
            out[i] = lab[i] == counts.argmax()
    return out


_SCALES = (0.92, 1.0, 1.08)


def _shape_scores(masks: np.ndarray) -> np.ndarray:
    """IoU of each mask ``[N, H, W]`` with each ideal shape of the same area and centroid,
    best over a few scales: ``[N, len(SHAPES)]``."""
    n, h, w = masks.shape
    area = masks.sum((1, 2)).astype(np.float64)
    ys, xs = np.mgrid[0:h, 0:w]
    safe = np.maximum(area, 1)
    cx = ((masks * xs).sum((1, 2)) / safe + 0.5) / w
    cy = ((masks * ys).sum((1, 2)) / safe + 0.5) / h
    frac = area / (h * w)
    names, sizes, centers, owner = [], [], [], []
    for i in range(n):
        for k, name in enumerate(SHAPES):
            for scale in _SCALES:
                s = scale * float(np.sqrt(frac[i] / FILL_FRACTION[name]))
                names.append(name)
                sizes.append(s)
                centers.append((cx[i], cy[i] - CENTROID_OFFSET[name] * s))
                owner.append(i)
    ideal = shape_mask(names, np.array(sizes), np.array(centers), resolution=h)
    m = masks[np.array(owner)]
    inter = (ideal & m).sum((1, 2))
    union = np.maximum((ideal | m).sum((1, 2)), 1)
    iou = (inter / union).reshape(n, len(SHAPES), len(_SCALES))
    return iou.max(2)


def judge_batch(images) -> list[Judgement]:
    """Judge a batch of images (see module docstring for the accepted forms)."""
    x = to_batch(images).numpy()
    labels = quantise(_median3(x))  # [N, H, W]
    n, h, w = labels.shape
    border = np.zeros((h, w), dtype=bool)
    border[:_BORDER] = border[-_BORDER:] = True
    border[:, :_BORDER] = border[:, -_BORDER:] = True
    k = len(COLOURS)
    bgs = np.array([np.bincount(labels[i][border], minlength=k).argmax() for i in range(n)])
    fg = labels != bgs[:, None, None]
    fg = _shift_sum(fg.astype(np.float32)) > 4.5  # 3x3 majority
    comps = _largest_components(fg)
    areas = comps.sum((1, 2))
    has = areas >= 4
    scores = np.zeros((n, len(SHAPES)))
    if has.any():
        scores[has] = _shape_scores(comps[has])
    out = []
    for i in range(n):
        if not has[i]:
            out.append(Judgement(COLOURS[bgs[i]], None, None, 0.0, float(areas[i]) / (h * w)))
            continue
        inside = labels[i][comps[i]]
        inside = inside[inside != bgs[i]]
        colour = COLOURS[np.bincount(inside, minlength=k).argmax()] if inside.size else None
        best = int(scores[i].argmax())
        out.append(
            Judgement(
                background=COLOURS[bgs[i]],
                colour=colour,
                shape=SHAPES[best],
                shape_score=float(scores[i, best]),
                foreground_fraction=float(areas[i]) / (h * w),
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
