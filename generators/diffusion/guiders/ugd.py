"""The ``ugd`` guider (Universal Guidance) and the backward guidance it shares with ``tfg``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...base import option
from ..tables import clean_estimate
from .base import SCHEDULES, GuidedStep, check_choice, clean_descent, fold_clean_change, schedule_weights
from .clip import CLIPGuider


@dataclass
class BackwardOptions:
    """Backward guidance (``ugd``; ``tfg``'s mu iterations)."""

    backward_steps: int | None = option(None, "ugd: backward-guidance steps on the clean estimate; tfg: its mu "
                                              "iterations (0: none)", minimum=0)
    backward_lr: float | None = option(None, "ugd/tfg: step size of the clean-estimate optimisation (tfg: mu)")
    backward_schedule: str | None = option(None, "ugd/tfg: schedule of --backward-lr over the guided steps",
                                           choices=SCHEDULES)


class BackwardGuidance:
    """Shared options of guiders with a clean-estimate optimisation (UGD backward guidance, TFG's mu)."""

    Options = BackwardOptions

    @classmethod
    def settings_kwargs(cls, s) -> dict[str, Any]:
        return {**super().settings_kwargs(s), "backward_steps": s.backward_steps, "backward_lr": s.backward_lr,
                "backward_schedule": s.backward_schedule}

    def _init_backward(self, backward_steps: int, backward_lr: float, backward_schedule: str) -> None:
        if int(backward_steps) < 0:
            raise ValueError(f"backward_steps is {backward_steps}; use 0 (none) or more")
        if not math.isfinite(backward_lr):
            raise ValueError(f"backward_lr is {backward_lr}; give a finite number")
        check_choice("backward_schedule", backward_schedule, SCHEDULES)
        self.backward_steps, self.backward_lr = int(backward_steps), float(backward_lr)
        self.backward_schedule = backward_schedule
        self.backward_weights: dict[int, float] = {}

    @property
    def backward_on(self) -> bool:
        return self.backward_steps > 0 and self.backward_lr != 0

    def _corrects(self) -> bool:
        return self.scale != 0 or self.backward_on     # backward guidance acts even at scale 0

    def setup(self, num_steps: int, tables=None) -> None:
        super().setup(num_steps, tables)
        self.backward_weights = schedule_weights(self.backward_schedule, sorted(self.steps), tables, num_steps)

    def backward_rate(self, index: int) -> float:
        return self.backward_lr * self.backward_weights.get(index, 1.0)


class UGDGuider(BackwardGuidance, CLIPGuider):
    """Universal Guidance (Bansal et al., ICLR 2024, arXiv 2302.07121, Alg. 1): forward guidance (``eps' = eps +
    s(t) sqrt(1-ab) grad_{z_t} L(D(x0_hat))``: the ``clip`` guider's rule with its ``--guidance-gradient`` mode:
    ``full`` is the paper's, through the UNet's CFG-combined output as its SD code; clipsteer's default is
    ``x0``, the fast mode, a documented deviation), backward guidance (``Delta0 = argmin_Delta
    L(D(x0_hat + Delta))`` by ``backward_steps`` gradient steps of size ``backward_lr`` from the *unguided*
    ``x0_hat``, folded back as ``eps' -= sqrt(ab / (1-ab)) Delta0``; Training-Free-Guidance ``methods/ugd.py``
    L30-50) and self-recurrence (``--recurrence K``: the loop re-noises ``x_{t-1}`` back to ``x_t`` and repeats
    the step). With recurrence 1 and no backward steps it is the ``clip`` guider.
    """

    name = "ugd"

    def __init__(self, objective=None, *, backward_steps: int = 0, backward_lr: float = 0.1,
                 backward_schedule: str = "constant", prediction: str = "cfg", **kwargs):
        super().__init__(objective, prediction=prediction, **kwargs)
        self._init_backward(backward_steps, backward_lr, backward_schedule)

    def model_output(self, step: GuidedStep):
        if not self.active(step.index):
            return step.model(step.z), None
        if self.scale != 0:
            out, correction, loss = self._forward(step)
            guided = out + correction
        else:
            out, loss = step.model(step.z), None
            guided = out
        if self.backward_on:
            x0 = clean_estimate(step.z, out, step.alpha_bar, step.prediction_type)    # the unguided x0_hat
            delta, first = clean_descent(self, step, x0, iterations=self.backward_steps,
                                          lr=lambda _: self.backward_rate(step.index))
            guided, loss = fold_clean_change(guided, delta, step), loss if loss is not None else first
        return guided, loss

    def describe(self) -> dict[str, Any]:
        on = self.enabled
        return {**super().describe(), "backward_steps": self.backward_steps if on else 0,
                "backward_lr": self.backward_lr if on else None}
