"""The ``mpgd`` guider: the gradient at the clean estimate only, applied to x_{t-1}."""

from __future__ import annotations



import torch

from ..tables import clean_estimate
from .base import GuidedStep, Guider, clean_descent


class MPGDGuider(Guider):
    """Manifold Preserving Guided Diffusion without projection (He et al., ICLR 2024, Alg. 2, "MPGD w/o
    proj."): the gradient of the objective with respect to the clean estimate only (no UNet backward),
    ``x0' = x0 - c_t grad_x0 L(D(x0))``, then the DDIM step with the corrected clean estimate and the
    same noise: ``x_{t-1} += sqrt(ab_{t-1}) (x0' - x0)``, applied to whatever the scheduler's step
    returned. ``c_t`` is the scale times the strength schedule. (The ``clip`` guider's ``x0`` mode
    takes the same gradient but turns it into a noise-prediction correction.)
    """

    name = "mpgd"

    def __init__(self, objective=None, **kwargs):
        super().__init__(objective, **kwargs)
        self._delta: dict[int, torch.Tensor] = {}

    def model_output(self, step: GuidedStep):
        out = step.model(step.z)
        if not self.active(step.index):
            return out, None
        x0 = clean_estimate(step.z, out, step.alpha_bar, step.prediction_type)
        c = self.strength(step.index)
        delta, loss = clean_descent(self, step, x0, iterations=1, lr=lambda _: c)
        self._delta = {step.index: delta}
        return out, loss

    def sample_correction(self, step: GuidedStep, sample: torch.Tensor) -> torch.Tensor:
        delta = self._delta.pop(step.index, None)
        if delta is None:
            return sample
        return sample + step.to_sample(step.next_alpha_bar.sqrt() * delta)
