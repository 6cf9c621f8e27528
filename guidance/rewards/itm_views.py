"""Image-text matching over several views of each image (test-time augmentation): the ITM log-odds
(:mod:`guidance.rewards.itm`) averaged over eight views -- the image itself, mirrored left-right,
upside down and both (the caption's relation words mirrored with it: "left" <-> "right" for a
left-right mirror, "above" <-> "below" for an upside-down one), and the image shifted by 1/16 of its
size in each of the four directions (wrapping round). One view's score wobbles with where a shape
sits on the patch grid; the mean over views is a steadier verifier.

Measured as the verifier of best-of-N search in the toy world (docs/benchmarks.md): on the 80 tuning
prompts the eight-view mean picked a right image more often than the single view (best of 60: 92.5% against
85.0%), on the benchmark set it did not (92.5% against 93.8%; best of 30: 88.8% against 91.2%) -- one or two
images a category either way. It costs eight ITM passes per image instead of one (the text side is cached).

    --reward itm_views:toy=1      # any ITM model the itm reward loads
"""

from __future__ import annotations

import re

import torch

from .itm import ITMReward

# caption words that swap under each mirror
MIRRORED_WORDS = {"horizontal": {"left": "right", "right": "left"}, "vertical": {"above": "below", "below": "above"}}
SHIFT_FRACTION = 1 / 16


def mirror_caption(text: str, axis: str) -> str:
    """*text* with the relation words of a mirror along *axis* (``horizontal`` / ``vertical``) swapped."""
    table = MIRRORED_WORDS[axis]
    return re.sub(r"\b(%s)\b" % "|".join(table), lambda m: table[m.group(1)], text)


def views(pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The eight views of ``pixels [B,C,H,W]`` stacked along the batch (view-major) and their captions."""
    out, captions = [], []
    for flip_h in (False, True):
        for flip_v in (False, True):
            x, t = pixels, list(texts)
            if flip_h:
                x, t = x.flip(-1), [mirror_caption(s, "horizontal") for s in t]
            if flip_v:
                x, t = x.flip(-2), [mirror_caption(s, "vertical") for s in t]
            out.append(x)
            captions += t
    dy, dx = (max(1, round(n * SHIFT_FRACTION)) for n in pixels.shape[-2:])
    for shift in ((0, dx), (dy, 0), (0, -dx), (-dy, 0)):
        out.append(torch.roll(pixels, shifts=shift, dims=(-2, -1)))
        captions += list(texts)
    return torch.cat(out), captions


class ITMViews(ITMReward):
    """The ITM reward averaged over eight mirrored and shifted views of each image."""

    name = "itm_views"

    def score_pixels(self, pixels: torch.Tensor, prompts=None) -> torch.Tensor:
        texts = self._texts(prompts, pixels.shape[0])
        stacked, captions = views(pixels, texts)
        return super().score_pixels(stacked, captions).view(-1, pixels.shape[0]).mean(0)


__all__ = ["ITMViews", "mirror_caption", "views", "MIRRORED_WORDS"]
