"""The toy world: a tiny synthetic image world (coloured shapes on coloured backgrounds), a
pixel-level judge for it, and small CLIP / VQGAN / Stable Diffusion models trained on it that
load through the same code paths as the real ones. See ``toyworld/weights/TRAINING.md``."""

from .world import (
    COLOURS,
    PALETTE,
    RESOLUTION,
    SHAPES,
    TEMPLATES,
    WorldSample,
    caption,
    draw,
    render,
    sample,
)
from .judge import Judgement, judge, judge_batch
from .paths import ToyWeightsMissing, weights_dir

__all__ = [
    "COLOURS",
    "PALETTE",
    "RESOLUTION",
    "SHAPES",
    "TEMPLATES",
    "WorldSample",
    "caption",
    "draw",
    "render",
    "sample",
    "Judgement",
    "judge",
    "judge_batch",
    "ToyWeightsMissing",
    "weights_dir",
]
