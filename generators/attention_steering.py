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


__all__ = ["AttentionSteering", "SteeringContext", "STEERING", "register_attention_steering", "build_steering",
           "uses_attention_steering"]
