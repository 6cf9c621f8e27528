"""Layout guidance (Chen et al., WACV 2024, "Training-Free Layout Control with Cross-Attention Guidance",
its backward guidance): during the first steps, move the latents so that each subject token's
cross-attention falls inside the subject's box.

For each of the first ``layout_steps`` steps, up to ``layout_iterations`` times while the loss is above
``layout_threshold``: with ``a_k`` the share of subject k's attention inside its box (per cross-attention
map of the chosen resolution, averaged over heads), the loss is the mean over subjects and maps of
``(1 - a_k)^2``, and ``z <- z - scale * (1 - ab_t) * grad_z loss``. On the reference's LMS sampler this is
its ``x <- x - scale * sigma_t^2 * grad_x loss`` (``x = z / sqrt(ab)``, ``sigma^2 = (1 - ab) / ab``), here
in the VP frame so every scheduler gets the same move. The reference reads the maps of the mid block and
the first cross-attention up block; clipsteer reads every map of one resolution (16 for SD at 512 px),
which includes those of that up block.

Boxes (``--layout``): ``"circle:0,0,0.5,1;square:0.5,0,1,1"`` (subject word, then ``x0,y0,x1,y1`` as
fractions of the image, y down), or ``auto``: from the prompt's relation (``X to the left of Y``,
``right of``, ``above``, ``below``), or side by side for subjects joined by ``and``.
"""

from __future__ import annotations

import re

import torch

from .attend_excite import subject_token_indices, subject_words
from .attention_steering import AttentionSteering, SteeringContext, register_attention_steering
from .cross_attention import default_attention_res, record_cross_attention

Box = tuple[float, float, float, float]
# the first subject's box, the second's: wide margins, so each box holds an object of any toy size
RELATION_BOXES: dict[str, tuple[Box, Box]] = {
    "to the left of": ((0.0, 0.15, 0.5, 0.85), (0.5, 0.15, 1.0, 0.85)),
    "to the right of": ((0.5, 0.15, 1.0, 0.85), (0.0, 0.15, 0.5, 0.85)),
    "above": ((0.15, 0.0, 0.85, 0.5), (0.15, 0.5, 0.85, 1.0)),
    "below": ((0.15, 0.5, 0.85, 1.0), (0.15, 0.0, 0.85, 0.5)),
}


def side_by_side(n: int) -> list[Box]:
    """*n* equal vertical strips, left to right."""
    return [(i / n, 0.15, (i + 1) / n, 0.85) for i in range(n)]


def auto_layout(prompt: str) -> list[tuple[str, Box]]:
    """Boxes for the subjects of *prompt*: from its spatial relation, else side by side (one subject: no boxes,
    and layout guidance leaves the run unchanged)."""
    subjects = subject_words(prompt)
    for relation, boxes in RELATION_BOXES.items():
        if re.search(rf"\b{relation}\b", prompt.lower()) and len(subjects) == 2:
            return list(zip(subjects, boxes))
    if len(subjects) < 2:
        return []       # one subject: nothing to lay out (a batch of mixed prompts runs on unchanged)
    return list(zip(subjects, side_by_side(len(subjects))))


def parse_layout(text: str, prompt: str) -> list[tuple[str, Box]]:
    """``--layout`` as (subject word, box) pairs; ``auto``: :func:`auto_layout`."""
    if text.strip().lower() == "auto":
        return auto_layout(prompt)
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        word, _, numbers = part.partition(":")
        try:
            box = tuple(float(v) for v in numbers.split(","))
        except ValueError:
            box = ()
        if not word.strip() or len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ValueError(f"--layout part {part!r} is not WORD:x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 and "
                             "0 <= y0 < y1 <= 1; write e.g. 'circle:0,0,0.5,1;square:0.5,0,1,1' or auto")
        out.append((word.strip(), box))
    if not out:
        raise ValueError("--layout is empty; give WORD:x0,y0,x1,y1 boxes separated by ';', or auto")
    return out


def box_mask(box: Box, res: int) -> torch.Tensor:
    """``res x res`` mask of *box* (cells whose index range the box's fractions cover, as the reference)."""
    mask = torch.zeros(res, res)
    x0, y0, x1, y1 = (int(v * res) for v in box)
    mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
    return mask


def layout_loss(maps_per_layer: list[torch.Tensor], subjects: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Per image: the mean over subjects (their tokens averaged) and maps of ``(1 - share inside the box)^2``.
    *maps_per_layer*: ``[B, res, res, tokens]`` each; *subjects*: (token positions, mask) pairs."""
    total = 0.0
    for maps in maps_per_layer:
        for positions, mask in subjects:
            attn = maps[..., positions].permute(0, 3, 1, 2)                 # [B, K, res, res]
            share = (attn * mask.to(attn)).flatten(2).sum(-1) / attn.flatten(2).sum(-1).clamp_min(1e-12)
            total = total + ((1 - share) ** 2).mean(-1)
    return total / (len(subjects) * len(maps_per_layer))


@register_attention_steering
class LayoutGuidance(AttentionSteering):
    """``--layout``: the module docstring's rule."""

    name = "layout"

    def __init__(self, context: SteeringContext, layout: list[tuple[str, Box]], *, scale: float, steps: int,
                 iterations: int, threshold: float, res: int):
        self.context, self.layout, self.res = context, layout, res
        self.scale, self.steps, self.iterations, self.threshold = scale, steps, iterations, threshold
        self.subjects = [(subject_token_indices(context.tokenizer, context.prompt, [word]), box_mask(box, res))
                         for word, box in layout]
        self.losses: list[float] = []

    @classmethod
    def enabled(cls, settings) -> bool:
        return bool(getattr(settings, "layout", ""))

    @classmethod
    def check(cls, settings) -> None:
        if settings.layout.strip().lower() != "auto":
            parse_layout(settings.layout, "")

    @classmethod
    def from_settings(cls, settings, context: SteeringContext) -> "LayoutGuidance":
        res = settings.attention_res or default_attention_res(context.unet, context.latent_size[0])
        return cls(context, parse_layout(settings.layout, context.prompt), scale=settings.layout_scale,
                   steps=settings.layout_steps, iterations=settings.layout_iterations,
                   threshold=settings.layout_threshold, res=res)

    def loss(self, z, conditional) -> torch.Tensor:
        with record_cross_attention(self.context.unet, self.res) as store:
            conditional(z)
        return layout_loss(store.layer_maps(), self.subjects)

    def correct(self, index, z, conditional):
        if index >= self.steps or not self.subjects:
            return z
        move = self.scale * (1 - self.context.alpha_bars(index))
        for _ in range(self.iterations):
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                loss = self.loss(zz, conditional)
                (grad,) = torch.autograd.grad(loss.sum(), zz)
            self.losses.append(float(loss.mean()))
            active = (loss.detach() > self.threshold).view(-1, *([1] * (z.dim() - 1)))
            if not bool(active.any()):
                break
            z = torch.where(active, z - move * grad, z).detach()
        return z

    def describe(self):
        # the loss (mean over subjects and maps of (1 - attention share inside the box)^2) at the first and at
        # the last gradient step: how far the attention moved into the boxes
        moved = {"loss_first": self.losses[0], "loss_last": self.losses[-1]} if self.losses else {}
        return {"layout": {"boxes": {w: list(b) for w, b in self.layout}, "scale": self.scale,
                           "steps": self.steps, "iterations": self.iterations, "threshold": self.threshold,
                           "attention_res": self.res, **moved}}
