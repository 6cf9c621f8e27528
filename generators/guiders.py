"""Guiders: how an objective corrects a diffusion model's output inside the sampling loop.

The sampling loop of every diffusion backend is: prepare -> for each step: model output ->
``guider.model_output(step)`` (the guider's correction) -> ``scheduler.step``. A :class:`Guider`
owns its step window (``start`` / ``end`` / ``every``), its strength and the correction; it reads
noise levels from the run's :class:`~generators.sd_guidance.NoiseTables` (built once), never from
the scheduler's step-index state, so it may evaluate the same step twice.

A new guider is one class here (or in a user's file) plus ``register_guider("name", Class)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .sd_guidance import clean_estimate, clip_gradient, output_correction

HALF_LOSS_SCALE = 2.0 ** 10


def guided_steps(num_steps: int, *, start: float = 0.0, end: float = 1.0, every: int = 1) -> list[int]:
    """Indices of the steps to guide: those in ``[start, end)`` of the schedule, every ``every``-th from the first."""
    first = math.ceil(start * num_steps - 1e-9)
    stop = math.ceil(end * num_steps - 1e-9)
    return list(range(max(first, 0), min(stop, num_steps), max(int(every), 1)))


@dataclass
class Denoiser:
    """The model as a guider sees it, at one timestep (all outputs float32, in the model's parametrisation).

    ``__call__(z)``: the classifier-free-guided output, no gradients. ``conditional(z)``: the
    text-conditional output, differentiable in ``z``. ``combine(z, cond)``: the CFG output given
    an already computed conditional output (only the unconditional pass is run).
    """

    guided: Callable[[torch.Tensor], torch.Tensor]
    conditional: Callable[[torch.Tensor], torch.Tensor]
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.guided(z)


@dataclass
class GuidedStep:
    """One denoising step as handed to a guider."""

    index: int                 # run step index
    timestep: Any
    z: torch.Tensor            # the VP model input (``scale_model_input`` of the sample)
    alpha_bar: torch.Tensor    # from the run's noise tables
    prediction_type: str       # "epsilon", "v_prediction" or "sample"
    model: Denoiser
    decode: Callable[[torch.Tensor], torch.Tensor]   # differentiable: clean latents -> images in [0, 1]
    generator: torch.Generator                       # the objective's random stream


class Guider:
    """No guidance: the model output as it is. Subclasses correct it inside their window.

    Args:
        objective: a ``guidance.Objective`` (``None``: no guidance).
        scale: strength of the correction (0: off).
        start, end: the fraction ``[start, end)`` of the schedule that is guided.
        every: guide every k-th step inside the window.
    """

    name: ClassVar[str] = "none"

    def __init__(self, objective=None, *, scale: float = 0.0, start: float = 0.0, end: float = 1.0, every: int = 1):
        if not (math.isfinite(scale)):
            raise ValueError(f"guidance scale is {scale}; give a finite number")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"guidance window [{start}, {end}) is empty or outside [0, 1]; "
                             "use 0 <= --guidance-start < --guidance-end <= 1")
        if every < 1:
            raise ValueError(f"guidance_every is {every}; use 1 (every step) or more")
        self.objective, self.scale, self.start, self.end, self.every = objective, float(scale), start, end, int(every)
        self.steps: set[int] = set()
        self.loss_scale = 1.0

    @property
    def enabled(self) -> bool:
        return self.objective is not None and getattr(self.objective, "steers", True) and self.scale != 0

    def setup(self, num_steps: int) -> None:
        """Called once per run, before the first step."""
        self.steps = set(guided_steps(num_steps, start=self.start, end=self.end, every=self.every)) \
            if self.enabled else set()
        params = list(self.objective.parameters()) if self.enabled else []
        self.loss_scale = HALF_LOSS_SCALE if any(p.dtype == torch.float16 for p in params) else 1.0

    def active(self, index: int) -> bool:
        return index in self.steps

    def model_output(self, step: GuidedStep):
        """``(output, loss)``: the (corrected) model output and the objective's ``LossOutput`` (or ``None``)."""
        return step.model(step.z), None

    def describe(self) -> dict[str, Any]:
        return {"guider": self.name if self.enabled else None, "scale": self.scale if self.enabled else 0.0,
                "guided_steps": sorted(self.steps)}


class CLIPGuider(Guider):
    """Classifier guidance with an objective's gradient (Dhariwal & Nichol 2021, eq. 14:
    ``eps' = eps + scale * sqrt(1 - ab) * grad_z loss``), the rule of the diffusers community CLIP-guided
    pipeline and Disco Diffusion.

    ``gradient="x0"``: the gradient is taken at the clean estimate with the model output held fixed
    (no UNet backward; as MPGD, He et al. 2024). ``gradient="full"``: backpropagated through the UNet's
    text-conditional pass, which is run once and reused for CFG.
    """

    name = "clip"
    MODES = ("x0", "full")

    def __init__(self, objective=None, *, gradient: str = "x0", **kwargs):
        super().__init__(objective, **kwargs)
        if gradient not in self.MODES:
            raise ValueError(f"unknown guidance_gradient {gradient!r}; choose x0 or full")
        self.gradient = gradient

    def model_output(self, step: GuidedStep):
        if not self.active(step.index):
            return step.model(step.z), None
        full = self.gradient == "full"
        keep: dict[str, torch.Tensor] = {}

        def conditional(z: torch.Tensor) -> torch.Tensor:
            out = step.model.conditional(z)
            keep["cond"] = out.detach()
            return out

        out = None if full else step.model(step.z)
        grad, loss = clip_gradient(step.z, out, step.alpha_bar, step.prediction_type, decode=step.decode,
                                   loss_fn=self.objective, step=step.index, generator=step.generator,
                                   model=conditional if full else None, loss_scale=self.loss_scale)
        if full:
            out = step.model.combine(step.z, keep["cond"])
        delta_eps = self.scale * (1 - step.alpha_bar).sqrt() * grad        # Dhariwal & Nichol eq. 14
        return out + output_correction(delta_eps, step.alpha_bar, step.prediction_type), loss

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "guidance_gradient": self.gradient if self.enabled else None}


GUIDERS: dict[str, type[Guider]] = {"none": Guider, "clip": CLIPGuider}


def register_guider(name: str, cls: type[Guider]) -> None:
    """Make guider *cls* selectable as ``--guider name``."""
    GUIDERS[name] = cls


def make_guider(name: str, objective, **kwargs) -> Guider:
    """Guider *name* with its keyword arguments; a one-line error for an unknown name."""
    if name not in GUIDERS:
        raise ValueError(f"unknown guider {name!r}; choose from {', '.join(sorted(GUIDERS))}")
    return GUIDERS[name](objective, **kwargs)


def predicted_clean(step: GuidedStep, output: torch.Tensor) -> torch.Tensor:
    """The clean latent estimate implied by *output* at this step."""
    return clean_estimate(step.z, output, step.alpha_bar, step.prediction_type)


__all__ = ["Guider", "CLIPGuider", "GuidedStep", "Denoiser", "GUIDERS", "register_guider", "make_guider",
           "guided_steps", "predicted_clean", "HALF_LOSS_SCALE"]
