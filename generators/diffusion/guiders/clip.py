"""The ``clip`` guider: classifier guidance with the objective's gradient (the community pipeline's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...base import option
from ..tables import clip_gradient, output_correction
from .base import PREDICTIONS, GuidedStep, Guider, check_choice, full_gradient


CLIP_MODES = ("x0", "full", "community")


@dataclass
class CLIPOptions:
    """The ``clip`` rule's own option (also ``ugd``'s forward guidance)."""

    guidance_gradient: str | None = option(None, "clip/ugd: x0: gradient through the clean-latent estimate with the "
                                                 "UNet output held fixed (fast); full: backprop through the UNet "
                                                 "too; community: the community pipeline's rule exactly (blend, "
                                                 "sigma^2 moves on LMS/Euler)", choices=CLIP_MODES)


class CLIPGuider(Guider):
    """Classifier guidance with an objective's gradient (Dhariwal & Nichol 2021, eq. 14:
    ``eps' = eps + scale * sqrt(1 - ab) * grad_z loss``), the rule of the diffusers community CLIP-guided
    pipeline (``examples/community/clip_guided_stable_diffusion.py``, ``cond_fn``) and Disco Diffusion.

    ``gradient="community"``: the community pipeline's rule exactly: the gradient through the UNet pass
    (``prediction``; the pipeline's is the text-conditional one), the loss scored on the blend
    ``sqrt(1-ab) x0 + (1 - sqrt(1-ab)) z`` on VP schedulers (DDIM, PNDM, DPM++, UniPC), and on sigma
    schedulers (LMS, Euler, Euler ancestral) on ``x0`` with the latents moved by ``-scale * sigma^2 *
    grad_x loss`` and the model output left as it is (added to the sample the scheduler's step returns:
    the same for eps-prediction models, whose sigma-frame steps are ``x + f(eps)``).
    ``gradient="full"``: eq. 14 with the gradient of the unblended ``x0`` through the UNet, on every
    scheduler. ``gradient="x0"`` (clipsteer's default, fast): the gradient is taken at the clean estimate
    with the model output held fixed (no UNet backward; as MPGD, He et al. 2024).
    """

    name = "clip"
    MODES = CLIP_MODES
    Options = CLIPOptions

    @classmethod
    def settings_kwargs(cls, s) -> dict[str, Any]:
        return {**super().settings_kwargs(s), "gradient": s.guidance_gradient, "prediction": s.guidance_prediction}

    def __init__(self, objective=None, *, gradient: str = "x0", prediction: str = "conditional", **kwargs):
        super().__init__(objective, **kwargs)
        if gradient not in self.MODES:
            raise ValueError(f"unknown guidance_gradient {gradient!r}; choose {', '.join(self.MODES)}")
        check_choice("guidance_prediction", prediction, PREDICTIONS)
        self.gradient, self.prediction = gradient, prediction
        self._moves: dict[int, torch.Tensor] = {}

    def model_output(self, step: GuidedStep):
        if not self.active(step.index):
            return step.model(step.z), None
        out, correction, loss = self._forward(step)
        return out + correction, loss

    def _forward(self, step: GuidedStep):
        """``(model output, its correction, LossOutput)`` at an active step; the community rule on a sigma
        scheduler keeps its move of the latents for :meth:`sample_correction` (the correction is then 0)."""
        ab = step.alpha_bar
        if self.gradient == "x0":
            out = step.model(step.z)
            grad, loss = clip_gradient(step.z, out, ab, step.prediction_type, decode=step.decode,
                                       loss_fn=self.objective, step=step.index, generator=step.generator,
                                       loss_scale=self.loss_scale)
        else:
            community = self.gradient == "community"
            grad, out, loss, _ = full_gradient(self, step, blend=community and not step.sigma_frame)
            if community and step.sigma_frame:
                # cond_fn: latents += sigma^2 * grads, grads = -scale * dL/dx; x = z / sqrt(ab), sigma^2 = (1-ab)/ab
                self._moves = {step.index: -self.strength(step.index) * (1 - ab) / ab.sqrt() * grad}
                return out, torch.zeros_like(out), loss
        delta_eps = self.strength(step.index) * (1 - ab).sqrt() * grad   # Dhariwal & Nichol eq. 14
        return out, output_correction(delta_eps, ab, step.prediction_type), loss

    def sample_correction(self, step: GuidedStep, sample: torch.Tensor) -> torch.Tensor:
        move = self._moves.pop(step.index, None)
        return sample if move is None else sample + move

    def describe(self) -> dict[str, Any]:
        on = self.enabled
        return {**super().describe(), "guidance_gradient": self.gradient if on else None,
                "guidance_prediction": self.prediction if on and self.gradient != "x0" else None}
