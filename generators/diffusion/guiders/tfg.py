"""The ``tfg`` guider: Training-Free Guidance, with Monte-Carlo smoothing and backward guidance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...base import option
from ..tables import clean_estimate
from .base import PREDICTIONS, SMOOTHING_SCHEDULES, GuidedStep, Guider, check_choice, clean_descent, full_gradient
from .ugd import BackwardGuidance


@dataclass
class SmoothingOptions:
    """``tfg``'s Monte-Carlo smoothing of the objective."""

    smoothing: float | None = option(None, "tfg: std sigma of the Monte-Carlo smoothing noise on the clean estimate "
                                           "(0: none)", minimum=0)
    smoothing_schedule: str | None = option(None, "tfg: constant or decreasing (sigma * sqrt(1 - ab_t))",
                                            choices=SMOOTHING_SCHEDULES)
    smoothing_samples: int | None = option(None, "tfg: noise draws per Monte-Carlo smoothed objective", minimum=1)


class TFGGuider(BackwardGuidance, Guider):
    """Training-Free Guidance (Ye et al., NeurIPS 2024, Alg. 1), which contains DPS, MPGD, FreeDoM and
    UGD as special cases. Per guided step, ``recurrence`` times (the loop re-noises in between):

    - ``Delta_t = -rho_t grad_{x_t} L~(x0_hat(x_t))`` through the UNet (``rho_t``: the scale times
      ``--guidance-schedule``);
    - ``Delta_0``: ``backward_steps`` (N_iter) steps ``x0 <- x0 - mu_t grad_x0 L~(x0)`` on the clean
      estimate (``mu_t``: ``backward_lr`` times ``--backward-schedule``);
    - ``x_{t-1} = S(x_t) + Delta_t / sqrt(alpha_t) + sqrt(ab_{t-1}) Delta_0`` (the corrections are
      added, in VP coordinates, to whatever the scheduler's step ``S`` returned);

    where ``L~`` is the objective Monte-Carlo smoothed over ``smoothing_samples`` draws of Gaussian
    noise of std ``sigma_t`` added to the clean estimate (``smoothing`` times ``--smoothing-schedule``:
    ``constant`` or ``decreasing`` = ``sqrt(1 - ab_t)``; 0: no smoothing). ``Delta_t`` and ``Delta_0`` are
    taken at one clean estimate, that of ``prediction`` (the CFG-combined output by default, as
    Training-Free-Guidance's SD sampler; ``methods/tfg.py`` L102-123).
    """

    name = "tfg"
    Options = SmoothingOptions

    @classmethod
    def settings_kwargs(cls, s) -> dict[str, Any]:
        return {**super().settings_kwargs(s), "smoothing": s.smoothing, "smoothing_schedule": s.smoothing_schedule,
                "smoothing_samples": s.smoothing_samples, "prediction": s.guidance_prediction}

    def __init__(self, objective=None, *, backward_steps: int = 0, backward_lr: float = 0.1,
                 backward_schedule: str = "constant", smoothing: float = 0.0, smoothing_schedule: str = "constant",
                 smoothing_samples: int = 1, prediction: str = "cfg", **kwargs):
        super().__init__(objective, **kwargs)
        self._init_backward(backward_steps, backward_lr, backward_schedule)
        check_choice("guidance_prediction", prediction, PREDICTIONS)
        self.prediction = prediction
        if not (math.isfinite(smoothing) and smoothing >= 0):
            raise ValueError(f"smoothing is {smoothing}; use 0 (none) or a positive noise std")
        check_choice("smoothing_schedule", smoothing_schedule, SMOOTHING_SCHEDULES)
        if int(smoothing_samples) < 1:
            raise ValueError(f"smoothing_samples is {smoothing_samples}; use 1 or more")
        self.smoothing, self.smoothing_schedule = float(smoothing), smoothing_schedule
        self.smoothing_samples = int(smoothing_samples)
        self._pending: dict[int, tuple] = {}

    def _noise(self, step: GuidedStep) -> torch.Tensor | None:
        if self.smoothing == 0:
            return None
        std = self.smoothing * (float((1 - step.alpha_bar).sqrt()) if self.smoothing_schedule == "decreasing" else 1.0)
        shape = (self.smoothing_samples, *step.z.shape)
        noise = torch.randn(shape, generator=step.generator, device=step.generator.device, dtype=torch.float32)
        return std * noise.to(step.z.device)

    def model_output(self, step: GuidedStep):
        if not self.active(step.index):
            return step.model(step.z), None
        noise, rho = self._noise(step), self.strength(step.index)
        delta_t, loss = None, None
        if rho != 0:
            grad, out, loss, x0 = full_gradient(self, step, noise)     # Delta_0 starts from the x0 scored here
            delta_t = -rho * grad
        else:
            out = step.model(step.z)
            x0 = clean_estimate(step.z, out, step.alpha_bar, step.prediction_type)
        delta_0 = None
        if self.backward_on:
            delta_0, first = clean_descent(self, step, x0, iterations=self.backward_steps,
                                            lr=lambda _: self.backward_rate(step.index), noise=noise)
            loss = loss if loss is not None else first
        self._pending = {step.index: (delta_t, delta_0)}
        return out, loss

    def sample_correction(self, step: GuidedStep, sample: torch.Tensor) -> torch.Tensor:
        delta_t, delta_0 = self._pending.pop(step.index, (None, None))
        change = None
        if delta_t is not None:
            alpha_t = (step.alpha_bar / step.next_alpha_bar).clamp(max=1.0)
            change = delta_t / alpha_t.sqrt()
        if delta_0 is not None:
            moved = step.next_alpha_bar.sqrt() * delta_0
            change = moved if change is None else change + moved
        return sample if change is None else sample + step.to_sample(change)

    def describe(self) -> dict[str, Any]:
        on = self.enabled
        return {**super().describe(), "backward_steps": self.backward_steps if on else 0,
                "backward_lr": self.backward_lr if on else None, "smoothing": self.smoothing if on else None,
                "guidance_prediction": self.prediction if on else None}
