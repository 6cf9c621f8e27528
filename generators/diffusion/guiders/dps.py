"""The ``dps`` and ``freedom`` guiders: a step on x_{t-1} by the gradient through the UNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...base import option
from ..tables import clean_estimate
from .base import PREDICTIONS, STEP_RULES, GuidedStep, Guider, check_choice, full_gradient, per_image, rms


@dataclass
class DPSOptions:
    """The step-size rule of ``dps`` and ``freedom``."""

    step_rule: str | None = option(None, "dps/freedom step size: scale, loss (scale/|L|: DPS paper), relative (to the "
                                         "sampler's update: clipsteer's freedom) or cfg (FreeDoM's code: by the CFG "
                                         "update)", choices=STEP_RULES)


class DPSGuider(Guider):
    """Diffusion Posterior Sampling (Chung et al., ICLR 2023, Alg. 1 line 7): after the sampler's step,
    ``x_{t-1} = x'_{t-1} - zeta_t * grad_{x_t} L(D(x0_hat(x_t)))``, the gradient backpropagated through
    the clean estimate *and* the UNet (``prediction``: the CFG-combined output by default, as
    Training-Free-Guidance's SD sampler; or the text-conditional pass). The step is taken in VP
    coordinates (``z = sqrt(ab) x0 + sqrt(1-ab) eps``) and converted to the scheduler's sample frame, so
    every scheduler can use it. ``zeta_t`` (``step_rule``), per image, with ``s_t`` the scale times the
    strength schedule:

    - ``scale``: ``s_t`` (Training-Free-Guidance ``methods/freedom.py``'s rule);
    - ``loss``: ``s_t / |L|`` (the DPS paper's ``zeta' / ||y - A(x0)||``, TFG ``methods/dps.py`` L37);
    - ``relative``: ``s_t ||m_t - z_t|| / ||grad||``, relative to the sampler's own update ``m_t - z_t``;
    - ``cfg``: ``s_t rms(eps_cfg - eps_uncond) / rms(grad)`` (FreeDoM's SD sampler, its factor 0.2 = ``s_t``).
    """

    name = "dps"
    default_step_rule: ClassVar[str] = "scale"
    Options = DPSOptions

    @classmethod
    def settings_kwargs(cls, s) -> dict[str, Any]:
        return {**super().settings_kwargs(s), "step_rule": s.step_rule, "prediction": s.guidance_prediction}

    def __init__(self, objective=None, *, step_rule: str | None = None, prediction: str = "cfg", **kwargs):
        super().__init__(objective, **kwargs)
        step_rule = step_rule or self.default_step_rule
        check_choice("step_rule", step_rule, STEP_RULES)
        check_choice("guidance_prediction", prediction, PREDICTIONS)
        self.step_rule, self.prediction = step_rule, prediction
        self._pending: dict[int, tuple] = {}

    def model_output(self, step: GuidedStep):
        if not self.active(step.index):
            return step.model(step.z), None
        grad, out, loss, _ = full_gradient(self, step)
        reference = None
        if self.step_rule == "loss":
            reference = loss.per_image.detach().abs()
        elif self.step_rule == "cfg":
            if step.model.unconditional is None:
                raise ValueError("--step-rule cfg (FreeDoM's own step size) needs classifier-free guidance; use "
                                 "--cfg-scale above 1 or another --step-rule")
            with torch.no_grad():
                uncond = step.model.unconditional(step.z)
            ab, kind = step.alpha_bar, step.prediction_type
            eps = [(step.z - ab.sqrt() * clean_estimate(step.z, o, ab, kind)) / (1 - ab).sqrt() for o in (out, uncond)]
            reference = rms(eps[0] - eps[1])
        self._pending = {step.index: (grad, reference)}
        return out, loss

    def step_size(self, step: GuidedStep, sample: torch.Tensor, grad: torch.Tensor, reference=None):
        """``zeta_t`` per image (see the class); *reference*: ``|L|`` (``loss``) or the CFG update's rms (``cfg``)."""
        s = self.strength(step.index)
        if self.step_rule == "scale":
            return s
        if self.step_rule == "loss":
            return s / per_image(reference.to(grad.dtype).clamp_min(1e-12), grad)
        if self.step_rule == "relative":
            update = (step.to_vp(sample) - step.z).flatten(1).norm(dim=1)
            return s * per_image(update / grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
        return s * per_image(reference.to(grad.dtype) / rms(grad).clamp_min(1e-12), grad)

    def sample_correction(self, step: GuidedStep, sample: torch.Tensor) -> torch.Tensor:
        grad, reference = self._pending.pop(step.index, (None, None))
        if grad is None:
            return sample
        return sample - step.to_sample(self.step_size(step, sample, grad, reference) * grad)

    def describe(self) -> dict[str, Any]:
        on = self.enabled
        return {**super().describe(), "step_rule": self.step_rule if on else None,
                "guidance_prediction": self.prediction if on else None}


class FreeDoMGuider(DPSGuider):
    """FreeDoM (Yu et al., ICCV 2023, Alg. 1): ``x_{t-1} = m_t - rho_t * grad_{x_t} E(x0|t)``
    after the sampler's step (``m_t``), the energy gradient through the UNet as in DPS, plus time-travel
    (self-recurrence, ``--recurrence``). clipsteer's ``rho_t`` (``step_rule="relative"``) is set per image
    relative to the sampler's own update, ``rho_t = scale * w_t * ||m_t - x_t|| / ||grad||`` (in VP
    coordinates), so one scale (~0.05-1) fits every step and objective; FreeDoM's own SD code sizes it by the
    CFG update instead (``step_rule="cfg"``, ``--guider-defaults paper``; see :class:`DPSGuider`).
    """

    name = "freedom"
    default_step_rule = "relative"
