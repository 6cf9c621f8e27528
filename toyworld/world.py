"""The toy world: one filled shape of one colour on a uniform background of another colour.

Everything here is pure numpy and deterministic given a seed. Images are ``RESOLUTION`` x
``RESOLUTION`` RGB, uint8, and every pixel is exactly one of the two palette colours (no
anti-aliasing), so a judge can recover the attributes from the pixels alone.

Geometry is expressed in fractions of the canvas: a shape of ``size`` s centred at ``center``
(cx, cy) lies inside the axis-aligned box of side s around (cx, cy); ``y`` grows downwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

RESOLUTION = 64

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZE_RANGE: tuple[float, float] = (0.40, 0.75)
CROSS_ARM = 1.0 / 3.0  # arm thickness of the plus sign, as a fraction of its size

# Area of each shape divided by the area of its s x s bounding box, and the vertical offset of
# its centroid from the box centre in units of s (only the apex-up triangle is asymmetric).
FILL_FRACTION = {
    "circle": float(np.pi / 4),
    "square": 1.0,
    "triangle": 0.5,
    "cross": 2 * CROSS_ARM - CROSS_ARM**2,
}
CENTROID_OFFSET = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6.0, "cross": 0.0}

# ---------------------------------------------------------------------------------------------
# Captions. A template names the attributes it mentions through its placeholders.
# ---------------------------------------------------------------------------------------------
TEMPLATES: tuple[str, ...] = (
    # colour + shape + background
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape} against a {background} background",
    "a {colour} {shape} on {background}",
    "a picture of a {colour} {shape} on a {background} background",
    "a {colour} {shape} in front of a {background} background",
    # colour + shape
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {colour} {shape} shape",
    # shape + background
    "a {shape} on a {background} background",
    "a {shape} against a {background} background",
    # colour + background
    "a {colour} shape on a {background} background",
    "something {colour} on a {background} background",
    # single attributes
    "a {shape}",
    "something {colour}",
    "a {background} background",
)
CANONICAL_TEMPLATE = TEMPLATES[0]
_ATTRS = ("colour", "shape", "background")


def template_attributes(template: str) -> tuple[str, ...]:
    """The attributes (``colour``, ``shape``, ``background``) a template mentions."""
    return tuple(a for a in _ATTRS if "{" + a + "}" in template)


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    template: str | int | None = None,
    natural_articles: bool = True,
) -> str:
    """A caption for the given attributes.

    With no template, the most specific canonical template for the given attributes is used
    (e.g. ``caption("circle", "red", "blue") == "a red circle on a blue background"``). With
    ``natural_articles`` "a orange" becomes "an orange".
    """
    values = {"colour": colour, "shape": shape, "background": background}
    given = tuple(a for a in _ATTRS if values[a] is not None)
    if template is None:
        template = next(t for t in TEMPLATES if template_attributes(t) == given)
    elif isinstance(template, int):
        template = TEMPLATES[template]
    needed = template_attributes(template)
    missing = [a for a in needed if values[a] is None]
    if missing:
        raise ValueError(f"template {template!r} needs {missing}")
    text = template.format(**{a: values[a] for a in needed})
    return _fix_articles(text) if natural_articles else text


def caption_matches(
    caption_attrs: dict[str, str | None], shape: str, colour: str, background: str
) -> bool:
    """Whether a caption mentioning ``caption_attrs`` describes an image with these attributes."""
    actual = {"shape": shape, "colour": colour, "background": background}
    return all(v is None or actual[k] == v for k, v in caption_attrs.items())


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
    return c[None, :], c[:, None]  # x varies along columns, y along rows


def shape_mask(
    shape: str | Sequence[str],
    size: float | np.ndarray,
    center: tuple[float, float] | np.ndarray,
    resolution: int = RESOLUTION,
) -> np.ndarray:
    """Boolean mask(s) of a shape (``[H, W]``), or of a batch of shapes (``[N, H, W]``) when
    ``shape`` is a sequence and ``size``/``center`` are arrays of shape ``[N]`` / ``[N, 2]``."""
    batched = not isinstance(shape, str)
    shapes = list(shape) if batched else [shape]
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; choose from {SHAPES}")
    n = len(shapes)
    size = np.broadcast_to(np.asarray(size, dtype=np.float64), (n,))[:, None, None]
    center = np.broadcast_to(np.asarray(center, dtype=np.float64).reshape(-1, 2), (n, 2))
    kinds = np.array([SHAPES.index(s) for s in shapes])
    x, y = _grid(resolution)
    out = np.zeros((n, resolution, resolution), dtype=bool)
    for k, name in enumerate(SHAPES):
        sel = np.nonzero(kinds == k)[0]
        if len(sel) == 0:
            continue
        s = size[sel]
        dx = np.abs(x - center[sel, 0, None, None])
        dy = y - center[sel, 1, None, None]
        half = s / 2
        if name == "circle":
            m = dx**2 + dy**2 <= half**2
        elif name == "square":
            m = (dx <= half) & (np.abs(dy) <= half)
        elif name == "triangle":  # apex at (cx, cy - s/2); half-width grows linearly to s/2 at the base
            m = (np.abs(dy) <= half) & (dx <= (dy + half) / 2)
        else:  # cross: two arms of thickness s * CROSS_ARM
            arm = s * CROSS_ARM / 2
            m = ((dx <= half) & (np.abs(dy) <= arm)) | ((dx <= arm) & (np.abs(dy) <= half))
        out[sel] = m
    return out if batched else out[0]


def draw(
    shape: str,
    colour: str,
    background: str,
    size: float = 0.6,
    center: tuple[float, float] = (0.5, 0.5),
    resolution: int = RESOLUTION,
    as_pil: bool = False,
):
    """Draw one world image: a uint8 array ``[H, W, 3]`` (or a PIL image with ``as_pil``)."""
    for c in (colour, background):
        if c not in PALETTE:
            raise ValueError(f"unknown colour {c!r}; choose from {COLOURS}")
    mask = shape_mask(shape, size, center, resolution)
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = PALETTE[background]
    img[mask] = PALETTE[colour]
    if as_pil:
        from PIL import Image

        return Image.fromarray(img)
    return img


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
@dataclass
class WorldSample:
    """A batch of world images with their attributes and captions."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    shapes: list[str]
    colours: list[str]
    backgrounds: list[str]
    sizes: np.ndarray  # [N] fraction of the canvas
    centers: np.ndarray  # [N, 2] (cx, cy) fractions of the canvas
    captions: list[str]
    caption_attributes: list[dict[str, str | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.shapes)

    def tensors(self, device=None):
        """Images as a float torch tensor ``[N, 3, H, W]`` in [0, 1]."""
        import torch

        t = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
        return t.to(device) if device is not None else t

    def pil(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])


def _rng(seed_or_generator) -> np.random.Generator:
    if isinstance(seed_or_generator, np.random.Generator):
        return seed_or_generator
    return np.random.default_rng(seed_or_generator)


def sample_attributes(n: int, generator=None) -> dict[str, np.ndarray]:
    """Random attributes: shape, colour, background (!= colour), size, centre (box inside)."""
    rng = _rng(generator)
    shape_idx = rng.integers(0, len(SHAPES), n)
    colour_idx = rng.integers(0, len(COLOURS), n)
    # background uniformly among the 7 other colours
    bg_idx = (colour_idx + rng.integers(1, len(COLOURS), n)) % len(COLOURS)
    sizes = rng.uniform(*SIZE_RANGE, n)
    centers = sizes[:, None] / 2 + rng.uniform(0, 1, (n, 2)) * (1 - sizes[:, None])
    return {"shape": shape_idx, "colour": colour_idx, "background": bg_idx, "size": sizes, "center": centers}


def render(
    shapes: Sequence[str],
    colours: Sequence[str],
    backgrounds: Sequence[str],
    sizes: np.ndarray,
    centers: np.ndarray,
    resolution: int = RESOLUTION,
) -> np.ndarray:
    """Vectorised ``draw`` for a batch: uint8 ``[N, H, W, 3]``."""
    masks = shape_mask(list(shapes), np.asarray(sizes), np.asarray(centers), resolution)
    fg = np.array([PALETTE[c] for c in colours], dtype=np.uint8)[:, None, None, :]
    bg = np.array([PALETTE[c] for c in backgrounds], dtype=np.uint8)[:, None, None, :]
    return np.where(masks[..., None], fg, bg)


def sample(
    n: int,
    generator=None,
    templates: Sequence[str] | None = None,
    resolution: int = RESOLUTION,
    plain_article_prob: float = 0.0,
) -> WorldSample:
    """Sample ``n`` world images with a caption each.

    ``generator`` is a seed (int) or a ``numpy.random.Generator``; the same seed gives the same
    batch. Each caption uses a template drawn uniformly from ``templates`` (default: all of
    ``TEMPLATES``); pass ``[CANONICAL_TEMPLATE]`` for full captions only. With probability
    ``plain_article_prob`` a caption keeps "a" before a vowel ("a orange circle").
    """
    rng = _rng(generator)
    attrs = sample_attributes(n, rng)
    shapes = [SHAPES[i] for i in attrs["shape"]]
    colours = [COLOURS[i] for i in attrs["colour"]]
    backgrounds = [COLOURS[i] for i in attrs["background"]]
    images = render(shapes, colours, backgrounds, attrs["size"], attrs["center"], resolution)
    templates = list(TEMPLATES if templates is None else templates)
    tpl_idx = rng.integers(0, len(templates), n)
    plain = rng.uniform(0, 1, n) < plain_article_prob
    captions, cap_attrs = [], []
    for i in range(n):
        tpl = templates[tpl_idx[i]]
        used = template_attributes(tpl)
        values = {"shape": shapes[i], "colour": colours[i], "background": backgrounds[i]}
        cap_attrs.append({a: (values[a] if a in used else None) for a in _ATTRS})
        captions.append(
            caption(**{a: values[a] for a in used}, template=tpl, natural_articles=not plain[i])
        )
    return WorldSample(
        images=images,
        shapes=shapes,
        colours=colours,
        backgrounds=backgrounds,
        sizes=attrs["size"],
        centers=attrs["center"],
        captions=captions,
        caption_attributes=cap_attrs,
    )


def all_full_captions(natural_articles: bool = True) -> list[tuple[str, str, str, str]]:
    """Every (caption, colour, shape, background) with the canonical template, background != colour."""
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            for background in COLOURS:
                if background != colour:
                    out.append(
                        (caption(shape, colour, background, natural_articles=natural_articles), colour, shape, background)
                    )
    return out
