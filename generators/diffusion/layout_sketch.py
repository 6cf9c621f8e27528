"""Layout sketch: start sampling from a painted sketch of the layout instead of pure noise.

SDEdit's stroke-to-image use (Meng et al., ICLR 2022, "SDEdit: Guided Image Synthesis and Editing with
Stochastic Differential Equations"), with the strokes drawn from the prompt: the canvas is painted in the
colour the prompt gives its background, each subject's box gets a soft blob in the colour the prompt gives
that subject, and the sampler starts from that sketch noised to ``--strength`` of the schedule (img2img).
The model redraws everything; what survives the noise is where the colours sit, so each subject tends to
appear in its box. It is what A1111 users do by hand with a rough colour sketch and img2img.

Boxes use layout guidance's syntax (``--layout-sketch "circle:0,0,0.5,1;square:0.5,0,1,1"``) or ``auto``
(from the prompt's relation, or side by side for subjects joined by ``and``; a prompt with one subject gets
no sketch and samples from noise). Colours are CSS colour names (PIL's table: ``red``, ``navy``, ...) read
from the word before each subject and before ``background``; a subject or background without one is
painted mid grey.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageColor

from .attend_excite import subject_phrases
from .layout_guidance import Box, parse_layout

GREY = (128, 128, 128)
# blob spread as a share of its box's width and height (a Gaussian's sigma): chosen on the toy tuning prompts
# (docs/benchmarks.md, "Layout sketch")
BLOB_SPREAD = 0.2


def colour_of(word: str | None) -> tuple[int, int, int] | None:
    """The RGB of a CSS colour name (``None`` when *word* is not one)."""
    if not word:
        return None
    try:
        return ImageColor.getrgb(word.lower())[:3]
    except ValueError:
        return None


def background_colour(prompt: str) -> tuple[int, int, int]:
    """The colour of ``... on a <colour> background`` (mid grey when the prompt names none)."""
    found = re.search(r"(\w+)\s+(background|backdrop)\s*$", prompt.strip().lower())
    return (colour_of(found.group(1)) if found else None) or GREY


def subject_colours(prompt: str) -> dict[str, tuple[int, int, int]]:
    """Each subject word's colour: the last colour name among the words before it in its part of the prompt."""
    out = {}
    for words in subject_phrases(prompt):
        colours = [c for c in map(colour_of, words[:-1]) if c is not None]
        out.setdefault(words[-1], colours[-1] if colours else GREY)
    return out


def sketch_image(prompt: str, layout: list[tuple[str, Box]], width: int, height: int) -> Image.Image:
    """The sketch: the background colour, then a soft blob per (subject, box) of *layout*, centred in the box,
    in the subject's colour (grey for a subject the prompt gives no colour)."""
    colours = subject_colours(prompt)
    image = np.empty((height, width, 3), np.float32)
    image[:] = background_colour(prompt)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    for word, (x0, y0, x1, y1) in layout:
        cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
        sx, sy = BLOB_SPREAD * (x1 - x0) * width, BLOB_SPREAD * (y1 - y0) * height
        weight = np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))[..., None]
        image = image * (1 - weight) + weight * np.asarray(colours.get(word.lower(), GREY), np.float32)
    return Image.fromarray(np.rint(image).clip(0, 255).astype(np.uint8))


def layout_sketch(spec: str, prompt: str, width: int, height: int) -> Image.Image | None:
    """The sketch for ``--layout-sketch`` *spec* (boxes or ``auto``) and *prompt*; ``None`` when the layout
    has no box (one subject under ``auto``): that run samples from noise."""
    layout = parse_layout(spec, prompt)
    return sketch_image(prompt, layout, width, height) if layout else None


__all__ = ["layout_sketch", "check_layout_sketch", "sketch_image", "subject_colours", "background_colour", "colour_of", "BLOB_SPREAD"]


def check_layout_sketch(spec: str, *, init_image: str | None = None) -> None:
    """One line, before any model loads, for a ``--layout-sketch`` that cannot be drawn."""
    if init_image:
        raise ValueError("--layout-sketch and --init-image both give the picture img2img starts from; drop one")
    if spec.strip().lower() != "auto":
        parse_layout(spec, "")      # the boxes' syntax (its error names the fix)
