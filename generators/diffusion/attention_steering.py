"""Attention steering: methods that move the latents before a denoising step so that the UNet's
cross-attention takes a wanted shape (Attend-and-Excite: every subject attended; layout guidance: each
subject inside its box).

They run before the step's guider, on the VP latent ``z`` (the model input), so they combine with any
``--guider`` (CLIP, DPS, MPGD, FreeDoM, UGD, TFG or none), any scheduler and CFG. They need a UNet with
cross-attention (SD 1.x/2.x, SDXL, the toy SD); SD3 and FLUX attend jointly over text and image tokens,
and the noise backend's few-step models take one to four steps, so neither is steered this way.

A method is one class with ``name``, ``from_settings(settings, context)`` (``None``: off) and
``correct(index, z, conditional) -> z``, registered with :func:`register_attention_steering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..base import option


@dataclass
class SteeringOptions:
    """The options of the attention-steering methods (part of the sd backend's ``Settings``)."""

    attend_excite: bool = option(False, "Attend-and-Excite (Chefer et al. 2023): before the first steps, move the "
                                        "latents until every subject token has a strong attention peak "
                                        "(UNet models; combines with any --guider)")
    subject_tokens: str = option("", "attend-excite/layout: the subject words (or token positions), comma-separated "
                                     "(default: the last word of each part of the prompt between 'and', commas "
                                     "and relations)")
    excite_scale: float = option(20.0, "attend-excite: step size factor (diffusers' scale_factor)", above=0)
    excite_steps: int = option(25, "attend-excite: the first steps that get its gradient step (diffusers' "
                                   "max_iter_to_alter)", minimum=0)
    excite_thresholds: str = option("0:0.05,10:0.5,20:0.8", "attend-excite: STEP:PEAK pairs: at these steps, refine "
                                                             "until every subject's attention peak reaches PEAK")
    layout: str = option("", "layout guidance (Chen et al. 2024): boxes per subject, 'circle:0,0,0.5,1;square:"
                             "0.5,0,1,1' (x0,y0,x1,y1 fractions), or auto (from the prompt's relation)")
    layout_scale: float = option(30.0, "layout: step size (the reference's loss_scale)", above=0)
    layout_steps: int = option(10, "layout: the first steps that are steered", minimum=0)
    layout_iterations: int = option(5, "layout: gradient steps per steered step, at most", minimum=1)
    layout_threshold: float = option(0.2, "layout: stop a step's iterations once the loss is below this", minimum=0)
    attention_res: int = option(0, "attend-excite/layout: side of the cross-attention maps they read (0: 16, or "
                                   "the UNet's nearest)", minimum=0)


@dataclass
class SteeringContext:
    """What an attention-steering method knows of the run."""

    unet: torch.nn.Module
    tokenizer: Any
    prompt: str
    latent_size: tuple[int, int]     # (height, width) of the latents
    num_steps: int
    alpha_bars: Callable[[int], torch.Tensor]   # run step -> alpha_bar of its noise level


class AttentionSteering:
    """Base class: no change to the latents."""

    name: ClassVar[str] = "none"

    @classmethod
    def enabled(cls, settings) -> bool:
        """Whether *settings* turn this method on (checked before any model work)."""
        return False

    @classmethod
    def check(cls, settings) -> None:
        """One line for bad settings of this method, before any model loads."""

    @classmethod
    def from_settings(cls, settings, context: SteeringContext) -> "AttentionSteering":
        raise NotImplementedError

    def correct(self, index: int, z: torch.Tensor, conditional: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return z

    def describe(self) -> dict[str, Any]:
        return {}


STEERING: dict[str, type[AttentionSteering]] = {}


def register_attention_steering(cls: type[AttentionSteering]) -> type[AttentionSteering]:
    """Add *cls* to the methods the sd backend builds from its settings (usable as a class decorator)."""
    STEERING[cls.name] = cls
    return cls


def build_steering(settings, context_fn: Callable[[], SteeringContext]) -> list[AttentionSteering]:
    """The attention-steering methods that *settings* turn on (the context is built only if one is on)."""
    wanted = [cls for cls in STEERING.values() if cls.enabled(settings)]
    if not wanted:
        return []
    context = context_fn()
    return [cls.from_settings(settings, context) for cls in wanted]


def uses_attention_steering(settings) -> bool:
    return any(cls.enabled(settings) for cls in STEERING.values())



def steer_latents(methods, index: int, latents: torch.Tensor, c_in: torch.Tensor, conditional) -> torch.Tensor:
    """The sampler's latents after the attention-steering *methods* moved their model input ``z = c_in *
    latents`` (``c_in``: the scheduler's ``scale_model_input`` factor, 1 on VP schedulers)."""
    start = latents * c_in
    z = start
    for method in methods:
        z = method.correct(index, z, conditional)
    return latents if z is start else z / c_in

__all__ = ["SteeringOptions", "steer_latents", "AttentionSteering", "SteeringContext", "STEERING", "register_attention_steering", "build_steering",
           "uses_attention_steering"]
