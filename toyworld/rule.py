"""The judging rule of toy world v3, exactly as ``shared/TOYWORLD.md`` states it.

1. Background: every pixel is snapped to the nearest palette colour; the background is the most
   common snapped colour along the image border (the outermost ring of pixels).
2. Objects: the 4-connected regions of non-background pixels covering at least 1.5% of the image
   (no other filtering). Each has a colour (its majority snapped colour), a bounding box in pixel
   edges (x1, y1 exclusive) and a shape: the template of the four (``scenes.template_mask``) drawn to
   fill the box, or the box inset by 1 px on each side, with the highest IoU against the region.
3. An image is right when the objects found match the prompt exactly: the right number of objects,
   the right shapes, the right colour wherever the prompt names one (an extra object makes it wrong),
   and the right background.
4. ``position``: GenEval's relative-position test on the two boxes (``scenes.relation_holds``).

Scores: per-category accuracy, and overall = the mean of the five category accuracies.
Ties (equal counts or IoUs) go to the first in palette / shape order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import permutations
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import binomtest

from .prompts import CATEGORIES, Prompt, parse_prompt
from .scenes import relation_holds, template_mask
from .world import COLOURS, PALETTE, SHAPES

MIN_REGION = 0.015  # share of the image a region must cover to count as an object
_PALETTE01 = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64) / 255.0


@dataclass(frozen=True)
class FoundObject:
    colour: str
    shape: str
    box: tuple[int, int, int, int]
    area: int  # pixels in the region
    iou: float  # IoU of the region with its shape's template


@dataclass(frozen=True)
class Reading:
    """What the rule reads off one image."""

    background: str
    objects: tuple[FoundObject, ...]


def _images(images) -> list[np.ndarray]:
    """Any accepted form -> list of float ``[H, W, 3]`` arrays in [0, 1]: a torch tensor ``[3, H, W]`` /
    ``[N, 3, H, W]`` in [0, 1], a uint8 ``[H, W, 3]`` / ``[N, H, W, 3]`` array, a PIL image, or a list."""
    if isinstance(images, (list, tuple)):
        return [im for x in images for im in _images(x)]
    if hasattr(images, "convert") and not isinstance(images, np.ndarray):  # PIL
        return [np.asarray(images.convert("RGB"), dtype=np.float64) / 255.0]
    if not isinstance(images, np.ndarray):  # torch tensor, channels first
        t = images.detach().float().cpu().clamp(0, 1)
        t = t[None] if t.ndim == 3 else t
        if t.shape[1] != 3:
            raise ValueError(f"expected RGB tensors [N, 3, H, W], got shape {tuple(t.shape)}")
        return list(t.permute(0, 2, 3, 1).double().numpy())
    arr = images[None] if images.ndim == 3 else images
    if arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 arrays [N, H, W, 3], got shape {arr.shape}")
    arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    return list(arr)


def snap(image: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of every pixel: float ``[H, W, 3]`` -> int ``[H, W]``."""
    d = ((image[:, :, None, :] - _PALETTE01[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def read(image: np.ndarray) -> Reading:
    """Apply steps 1-2 of the rule to one float ``[H, W, 3]`` image."""
    labels = snap(image)
    h, w = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    regions, n = ndimage.label(labels != bg)  # default structure: 4-connectivity
    if n == 0:
        return Reading(COLOURS[bg], ())
    sizes = np.bincount(regions.ravel(), minlength=n + 1)
    found = []
    for k in range(1, n + 1):
        if sizes[k] < MIN_REGION * h * w:
            continue
        mask = regions == k
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        colour = COLOURS[int(np.bincount(labels[mask], minlength=len(COLOURS)).argmax())]
        shape, iou = _best_shape(mask, box)
        found.append(FoundObject(colour, shape, box, int(sizes[k]), iou))
    return Reading(COLOURS[bg], tuple(found))


def _best_shape(mask: np.ndarray, box) -> tuple[str, float]:
    h, w = mask.shape
    x0, y0, x1, y1 = box
    boxes = [box] + ([(x0 + 1, y0 + 1, x1 - 1, y1 - 1)] if x1 - x0 > 2 and y1 - y0 > 2 else [])
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        for b in boxes:
            t = template_mask(shape, b, h, w)
            iou = float((t & mask).sum() / max((t | mask).sum(), 1))
            if iou > best_iou:
                best, best_iou = shape, iou
    return best, best_iou


def _fits(obj, spec: tuple[str | None, str]) -> bool:
    colour, shape = spec
    return obj.shape == shape and (colour is None or obj.colour == colour)


def matches(prompt: Prompt, background: str, objects: Sequence) -> bool:
    """Steps 3-4: whether ``objects`` (anything with ``colour``, ``shape`` and ``box``) on ``background``
    are exactly what ``prompt`` asks for."""
    if background != prompt.background or len(objects) != prompt.n_objects:
        return False
    for perm in permutations(objects):
        if all(_fits(o, s) for o, s in zip(perm, prompt.objects)):
            if prompt.relation is None or relation_holds(perm[0].box, perm[1].box, prompt.relation):
                return True
    return False


def _prompt(p) -> Prompt:
    return p if isinstance(p, Prompt) else parse_prompt(p)


def judge(images, prompts) -> list[bool]:
    """Whether each image is right for its prompt (a :class:`Prompt` or benchmark-grammar text)."""
    imgs = _images(images)
    prompts = [prompts] if isinstance(prompts, (str, Prompt)) else list(prompts)
    if len(imgs) != len(prompts):
        raise ValueError(f"{len(imgs)} images but {len(prompts)} prompts")
    out = []
    for im, p in zip(imgs, prompts):
        p = _prompt(p)
        r = read(im)
        out.append(matches(p, r.background, r.objects))
    return out


def read_images(images) -> list[Reading]:
    return [read(im) for im in _images(images)]


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of the proportion k/n (scipy's ``binomtest``)."""
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def category_scores(prompts: Iterable, correct: Iterable[bool]) -> dict:
    """Per-category ``{n, right, accuracy, ci95}`` and ``overall`` (the mean of the category accuracies
    present, GenEval's overall)."""
    tally: dict[str, list[int]] = {}
    for p, ok in zip(prompts, correct):
        t = tally.setdefault(_prompt(p).category, [0, 0])
        t[0] += 1
        t[1] += bool(ok)
    out: dict = {}
    for c in CATEGORIES:
        if c in tally:
            n, k = tally[c]
            out[c] = {"n": n, "right": k, "accuracy": k / n, "ci95": list(wilson(k, n))}
    accs = [out[c]["accuracy"] for c in CATEGORIES if c in out]
    out["overall"] = float(np.mean(accs)) if accs else math.nan
    return out
