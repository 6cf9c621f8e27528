"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): before the first denoising steps, move the latents so
that every subject token of the prompt holds a strong cross-attention peak somewhere in the image.

Per step ``i`` (the rule and defaults of diffusers' ``StableDiffusionAttendAndExcitePipeline``):

1. run the UNet on the latents with the prompt alone and average its ``res x res`` cross-attention maps
   over heads and layers;
2. per subject token: softmax over the prompt's tokens (the first and last of the padded sequence left
   out) of ``100 * map``, a 3x3 Gaussian blur, the maximum ``m_k``; the loss is ``max_k (1 - m_k)^+``;
3. at the steps of ``thresholds`` (``{0: 0.05, 10: 0.5, 20: 0.8}``), while the loss is above
   ``1 - threshold``, step the latents down its gradient (at most ``max_refinement`` times);
4. for the first ``excite_steps`` steps, one more gradient step:
   ``z <- z - step_size_i * grad_z loss`` with ``step_size_i = scale * sqrt(linspace(1, 0.5, T)_i)``.

The guided sampling step then runs on the moved latents as usual (any scheduler, CFG, and another
guider's correction on top). The 3x3 kernel is diffusers' ``GaussianSmoothing``, whose exponent is
``-((x - mean) / (2 sigma))^2``: a standard Gaussian of ``sigma * sqrt(2)``, which kornia applies.
"""

from __future__ import annotations

import math
import re

import torch

from .attention_steering import AttentionSteering, SteeringContext, register_attention_steering
from .cross_attention import default_attention_res, record_cross_attention

THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
MAX_REFINEMENT = 20
SMOOTHING_SIGMA = 0.5
RELATION_WORDS = ("to the left of", "to the right of", "on top of", "in front of", "next to", "above", "below",
                  "under", "behind", "beside", "with", "and")


def subject_phrases(prompt: str) -> list[list[str]]:
    """The words of each subject's phrase, by a rule for the simple prompts of composition benchmarks: the text
    is cut at commas, ``and``, ``with`` and the spatial relations, and a trailing ``on a ... background`` is
    dropped (``"a red circle to the left of a blue square"`` -> [a, red, circle], [a, blue, square])."""
    text = re.sub(r"\s+(on|against|in front of)\s+(a|an|the)?\s*\w+\s+(background|backdrop)\s*$", "",
                  prompt.strip().lower())
    parts = re.split(r",|\|" + "".join(rf"|\b{re.escape(w)}\b" for w in RELATION_WORDS), text)
    return [w for w in (re.findall(r"[a-z][a-z'-]*", part) for part in parts) if w]


def subject_words(prompt: str) -> list[str]:
    """The subjects of a prompt: the last word of each of :func:`subject_phrases`
    (``"a red circle to the left of a blue square"`` -> circle, square)."""
    return [words[-1] for words in subject_phrases(prompt)]


def subject_token_indices(tokenizer, prompt: str, subjects: list[str] | None = None) -> list[int]:
    """Positions (in the tokenized prompt, start token = 0) of the subject tokens: the first token of each
    occurrence of each subject word (``subjects``; default :func:`subject_words`), or the positions given
    as numbers."""
    ids = tokenizer(prompt).input_ids
    if subjects and all(str(s).strip().isdigit() for s in subjects):
        positions = [int(s) for s in subjects]
        bad = [p for p in positions if not 0 < p < len(ids) - 1]
        if bad:
            raise ValueError(f"subject token index {bad[0]} is outside the prompt's tokens 1-{len(ids) - 2}; "
                             "give the subject words instead (--subject-tokens circle,square)")
        return positions
    words = [str(s).strip().lower() for s in (subjects or subject_words(prompt)) if str(s).strip()]
    positions: list[int] = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        found = [i for i in range(1, len(ids) - len(pieces) + 1) if ids[i:i + len(pieces)] == pieces]
        if not found:
            raise ValueError(f"subject {word!r} is not a word of the prompt {prompt!r}; "
                             "give --subject-tokens words that occur in it")
        positions += [i for i in found if i not in positions]
    if not positions:
        raise ValueError(f"found no subject in the prompt {prompt!r}; give --subject-tokens (e.g. circle,square)")
    return sorted(positions)


def attend_excite_loss(maps: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Per image, ``max_k (1 - m_k)^+`` of the maps ``[B, res, res, tokens]`` at token positions *indices*."""
    from kornia.filters import gaussian_blur2d

    text = torch.softmax(maps[..., 1:-1] * 100, dim=-1)
    subjects = text[..., [i - 1 for i in indices]].permute(0, 3, 1, 2)          # [B, K, res, res]
    b, k, h, w = subjects.shape
    sigma = SMOOTHING_SIGMA * math.sqrt(2.0)
    smooth = gaussian_blur2d(subjects.reshape(b * k, 1, h, w), (3, 3), (sigma, sigma), border_type="reflect")
    peaks = smooth.reshape(b, k, -1).amax(dim=-1)
    return torch.relu(1.0 - peaks).amax(dim=-1)


def step_sizes(num_steps: int, scale: float) -> list[float]:
    """``scale * sqrt(linspace(1, 0.5, T))``: the step size at each of the run's T steps."""
    if num_steps == 1:
        return [float(scale)]
    return [scale * math.sqrt(1.0 - 0.5 * i / (num_steps - 1)) for i in range(num_steps)]


def excite(z: torch.Tensor, index: int, attention_loss, *, sizes: list[float], excite_steps: int,
           thresholds: dict[int, float], max_refinement: int = MAX_REFINEMENT) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents of step *index* after Attend-and-Excite, and the per-image loss at them.

    *attention_loss*: ``z -> per-image loss`` (differentiable). Each image is refined and stepped on its own
    loss (the losses of a batch do not mix: the gradient of their sum is the per-image gradient)."""
    def loss_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            loss = attention_loss(z)
            (grad,) = torch.autograd.grad(loss.sum(), z)
        return loss.detach(), grad

    size = sizes[index]
    loss, grad = loss_and_grad(z)
    if index in thresholds:
        target = max(0.0, 1.0 - thresholds[index])
        active = loss > target
        tries = 0
        while bool(active.any()):
            tries += 1
            loss_now, grad_now = loss_and_grad(z)
            mask = (active & (loss_now != 0)).view(-1, *([1] * (z.dim() - 1)))
            z = torch.where(mask, z - size * grad_now, z)
            active = active & (loss_now > target)
            if tries >= max_refinement:
                break
        loss, grad = loss_and_grad(z)
    if index < excite_steps:
        z = z - size * grad        # images with loss 0 have a zero gradient
    return z.detach(), loss


def parse_thresholds(text: str) -> dict[int, float]:
    """``"0:0.05,10:0.5,20:0.8"`` -> ``{0: 0.05, 10: 0.5, 20: 0.8}`` (run step: wanted attention peak)."""
    out: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        step, _, value = part.partition(":")
        try:
            out[int(step)] = float(value)
        except ValueError:
            raise ValueError(f"--excite-thresholds part {part!r} is not STEP:PEAK; write e.g. "
                             "0:0.05,10:0.5,20:0.8") from None
        if not 0.0 <= out[int(step)] <= 1.0:
            raise ValueError(f"--excite-thresholds peak {value} is outside [0, 1]; an attention peak is a probability")
    return out


@register_attention_steering
class AttendAndExcite(AttentionSteering):
    """``--attend-excite``: the module docstring's rule, on the run's subject tokens."""

    name = "attend_excite"

    def __init__(self, context: SteeringContext, indices: list[int], *, scale: float, excite_steps: int,
                 thresholds: dict[int, float], res: int):
        self.context, self.indices, self.res = context, indices, res
        self.scale, self.excite_steps, self.thresholds = scale, excite_steps, thresholds
        self.sizes = step_sizes(context.num_steps, scale)
        self.losses: list[float] = []

    @classmethod
    def enabled(cls, settings) -> bool:
        return bool(getattr(settings, "attend_excite", False))

    @classmethod
    def check(cls, settings) -> None:
        parse_thresholds(settings.excite_thresholds)

    @classmethod
    def from_settings(cls, settings, context: SteeringContext) -> "AttendAndExcite":
        subjects = [s for s in str(settings.subject_tokens or "").split(",") if s.strip()] or None
        indices = subject_token_indices(context.tokenizer, context.prompt, subjects)
        res = settings.attention_res or default_attention_res(context.unet, context.latent_size[0])
        return cls(context, indices, scale=settings.excite_scale, excite_steps=settings.excite_steps,
                   thresholds=parse_thresholds(settings.excite_thresholds), res=res)

    def correct(self, index, z, conditional):
        if index >= self.excite_steps and index not in self.thresholds:
            return z
        unet = self.context.unet

        def attention_loss(zz):
            with record_cross_attention(unet, self.res) as store:
                conditional(zz)
            return attend_excite_loss(store.maps(), self.indices)

        z, loss = excite(z, index, attention_loss, sizes=self.sizes, excite_steps=self.excite_steps,
                         thresholds=self.thresholds)
        self.losses.append(float(loss.mean()))
        return z

    def describe(self):
        tokens = self.context.tokenizer(self.context.prompt).input_ids
        words = self.context.tokenizer.convert_ids_to_tokens([tokens[i] for i in self.indices])
        return {"attend_excite": {"subject_tokens": [w.replace("</w>", "") for w in words],
                                  "token_indices": self.indices, "scale": self.scale,
                                  "excite_steps": self.excite_steps,
                                  "thresholds": {str(k): v for k, v in self.thresholds.items()},
                                  "attention_res": self.res}}
