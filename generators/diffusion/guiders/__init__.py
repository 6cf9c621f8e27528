"""Guiders: how an objective corrects a diffusion model's output inside the sampling loop.

The sampling loop of every diffusion backend is: prepare -> for each step: model output ->
``guider.model_output(step)`` (the guider's correction) -> ``scheduler.step``. A :class:`Guider`
owns its step window (``start`` / ``end`` / ``every``), its strength and the correction; it reads
noise levels from the run's :class:`~generators.diffusion.tables.NoiseTables` (built once), never from
the scheduler's step-index state, so it may evaluate the same step twice.

A guider may also correct the sample that ``scheduler.step`` returns (:meth:`Guider.sample_correction`,
for rules stated on ``x_{t-1}``: DPS, FreeDoM, MPGD, TFG) and ask the loop to repeat a step
(:meth:`Guider.repeats`: self-recurrence; the loop re-noises ``x_{t-1}`` back to ``x_t`` with
:func:`~generators.diffusion.tables.renoise` and restores the scheduler's step state).

Guiders here: ``clip`` (today's rule), ``dps``, ``mpgd``, ``freedom``, ``ugd``, ``tfg`` (see each
class for its paper and equation). A new guider is one class here (or in a user's file) plus
``register_guider("name", Class)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..tables import clean_estimate, clip_gradient, output_correction

HALF_LOSS_SCALE = 2.0 ** 10
SCHEDULES = ("constant", "increasing", "decreasing")
SMOOTHING_SCHEDULES = ("constant", "decreasing")
# what a guider that backpropagates through the UNet differentiates: the CFG-combined output (the SD samplers of
# Training-Free-Guidance, FreeDoM and Universal Guidance) or the text-conditional pass alone (the community pipeline)
PREDICTIONS = ("cfg", "conditional")
# how DPS/FreeDoM size their step on x_{t-1} (see DPSGuider)
STEP_RULES = ("scale", "loss", "relative", "cfg")


def guided_steps(num_steps: int, *, start: float = 0.0, end: float = 1.0, every: int = 1) -> list[int]:
    """Indices of the steps to guide: those in ``[start, end)`` of the schedule, every ``every``-th from the first."""
    first = math.ceil(start * num_steps - 1e-9)
    stop = math.ceil(end * num_steps - 1e-9)
    return list(range(max(first, 0), min(stop, num_steps), max(int(every), 1)))


@dataclass
class Denoiser:
    """The model as a guider sees it, at one timestep (all outputs float32, in the model's parametrisation).

    ``__call__(z)``: the classifier-free-guided output (differentiable in ``z`` under ``torch.enable_grad``).
    ``conditional(z)``: the text-conditional output, differentiable in ``z``. ``combine(z, cond)``: the CFG
    output given an already computed conditional output (only the unconditional pass is run).
    ``unconditional(z)``: the unconditional output (``None``: the run has no classifier-free guidance).
    """

    guided: Callable[[torch.Tensor], torch.Tensor]
    conditional: Callable[[torch.Tensor], torch.Tensor]
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    unconditional: Callable[[torch.Tensor], torch.Tensor] | None = None

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
    next_alpha_bar: torch.Tensor | None = None       # ``ab`` of the sample the scheduler's step returns
    sigma_frame: bool = False                        # the sample is x = z / sqrt(ab) (Euler, LMS), else x = z
    repeat: int = 0                                  # self-recurrence pass (0: the first)
    next_sample_scale: torch.Tensor | None = None    # rectified flow: the returned sample is this times z_{t-1}

    def to_sample(self, delta_z: torch.Tensor) -> torch.Tensor:
        """A change of the next VP latent ``z_{t-1}`` as a change of the sample the scheduler returned."""
        if self.next_sample_scale is not None:
            return delta_z * self.next_sample_scale
        if self.sigma_frame:
            return delta_z / self.next_alpha_bar.sqrt()
        return delta_z

    def to_vp(self, sample: torch.Tensor) -> torch.Tensor:
        """The sample the scheduler returned as the next VP latent ``z_{t-1}``."""
        if self.next_sample_scale is not None:
            return sample / self.next_sample_scale
        if self.sigma_frame:
            return sample * self.next_alpha_bar.sqrt()
        return sample


class Guider:
    """No guidance: the model output as it is. Subclasses correct it inside their window.

    Args:
        objective: a ``guidance.Objective`` (``None``: no guidance).
        scale: strength of the correction (0: off, for every guider).
        start, end: the fraction ``[start, end)`` of the schedule that is guided.
        every: guide every k-th step inside the window.
        recurrence: self-recurrence (Bansal et al. 2023, Alg. 1): run each guided step this many times,
            re-noising the result back to the step's noise level in between (1: no recurrence).
        schedule: the strength over the guided steps: ``constant``, ``increasing`` (``alpha_t = ab_t /
            ab_{t-1}``) or ``decreasing`` (``1 - alpha_t``), normalised to mean 1 over the guided steps
            (TFG's schedules, Ye et al. 2024, App. C).
    """

    name: ClassVar[str] = "none"

    def __init__(self, objective=None, *, scale: float = 0.0, start: float = 0.0, end: float = 1.0, every: int = 1,
                 recurrence: int = 1, schedule: str = "constant"):
        if not (math.isfinite(scale)):
            raise ValueError(f"guidance scale is {scale}; give a finite number")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"guidance window [{start}, {end}) is empty or outside [0, 1]; "
                             "use 0 <= --guidance-start < --guidance-end <= 1")
        if every < 1:
            raise ValueError(f"guidance_every is {every}; use 1 (every step) or more")
        if int(recurrence) < 1:
            raise ValueError(f"recurrence is {recurrence}; use 1 (no self-recurrence) or more")
        _check_choice("guidance_schedule", schedule, SCHEDULES)
        self.objective, self.scale, self.start, self.end, self.every = objective, float(scale), start, end, int(every)
        self.recurrence, self.schedule = int(recurrence), schedule
        self.steps: set[int] = set()
        self.weights: dict[int, float] = {}
        self.loss_scale = 1.0
        self.tables = None

    @property
    def enabled(self) -> bool:
        return self.objective is not None and getattr(self.objective, "steers", True) and self._corrects()

    def _corrects(self) -> bool:
        """Whether this guider's settings change anything (scale 0 turns the base rule off)."""
        return self.scale != 0

    def setup(self, num_steps: int, tables=None) -> None:
        """Called once per run, before the first step (*tables*: the run's ``NoiseTables``)."""
        self.steps = set(guided_steps(num_steps, start=self.start, end=self.end, every=self.every)) \
            if self.enabled else set()
        self.tables = tables
        self.weights = schedule_weights(self.schedule, sorted(self.steps), tables, num_steps)
        params = list(self.objective.parameters()) if self.enabled else []
        self.loss_scale = HALF_LOSS_SCALE if any(p.dtype == torch.float16 for p in params) else 1.0

    def active(self, index: int) -> bool:
        return index in self.steps

    def strength(self, index: int) -> float:
        """The scale at run step *index* after the strength schedule."""
        return self.scale * self.weights.get(index, 1.0)

    def repeats(self, index: int) -> int:
        """How many times the loop runs step *index* (self-recurrence; 1 outside the window)."""
        return self.recurrence if self.active(index) else 1

    def model_output(self, step: GuidedStep):
        """``(output, loss)``: the (corrected) model output and the objective's ``LossOutput`` (or ``None``)."""
        return step.model(step.z), None

    def sample_correction(self, step: GuidedStep, sample: torch.Tensor) -> torch.Tensor:
        """The sample ``scheduler.step`` returned for *step*, corrected (rules stated on ``x_{t-1}``)."""
        return sample

    def describe(self) -> dict[str, Any]:
        on = self.enabled
        return {"guider": self.name if on else None, "scale": self.scale if on else 0.0,
                "guided_steps": sorted(self.steps), "recurrence": self.recurrence if on else 1,
                "guidance_schedule": self.schedule if on else None}


def _check_choice(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose {', '.join(choices)}")


def schedule_weights(kind: str, steps: list[int], tables=None, num_steps: int | None = None) -> dict[int, float]:
    """Per-step weights of a strength schedule over *steps*, mean 1 (TFG, Ye et al. 2024: ``constant`` 1,
    ``increasing`` ``alpha_t = ab_t / ab_{t-1}``, ``decreasing`` ``beta_t = 1 - alpha_t``, from the run's
    noise tables; without tables a linear ramp over the run)."""
    if not steps or kind == "constant":
        return {i: 1.0 for i in steps}
    if tables is not None and getattr(tables, "next_alpha_bars", None) is not None:
        alphas = tables.step_alphas().double().cpu()
        raw = [float(alphas[i]) if kind == "increasing" else float(1 - alphas[i]) for i in steps]
    else:
        n = max(num_steps or (max(steps) + 1), 2)
        raw = [(i + 1) / n if kind == "increasing" else (n - i) / n for i in steps]
    mean = sum(raw) / len(raw)
    if mean <= 0:
        return {i: 1.0 for i in steps}
    return {i: r / mean for i, r in zip(steps, raw)}


def descend(loss: torch.Tensor, wrt: torch.Tensor, loss_scale: float = 1.0) -> torch.Tensor:
    """``d loss / d wrt`` (fp16-safe: *loss_scale* multiplies the loss for the backward, then divides)."""
    (grad,) = torch.autograd.grad(loss * loss_scale, wrt)
    if loss_scale != 1.0:
        grad = torch.nan_to_num(grad / loss_scale, nan=0.0, posinf=0.0, neginf=0.0)
    return grad


def smoothed_loss(objective, decode, x0: torch.Tensor, *, step: int, generator, noise: torch.Tensor | None = None):
    """The objective of the decoded clean estimate; with *noise* ``[K, *x0.shape]`` its Monte-Carlo
    smoothed form ``L~(x0) = -log (1/K) sum_k exp(-L(x0 + noise_k))`` (TFG, Ye et al. 2024, its
    smoothed predictor ``f~``, with ``log f = -L``)."""
    from guidance.objective import LossOutput

    if noise is None:
        return objective(decode(x0), step=step, generator=generator)
    k = noise.shape[0]
    out = objective(decode((x0.unsqueeze(0) + noise).flatten(0, 1)), step=step, generator=generator)
    per = out.per_image.float().view(k, -1)
    per_image = math.log(k) - torch.logsumexp(-per, dim=0)
    parts = {name: v.float().view(k, -1).mean(0) for name, v in out.parts.items()}
    return LossOutput(total=per_image.sum(), per_image=per_image, parts=parts)


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
    MODES = ("x0", "full", "community")

    def __init__(self, objective=None, *, gradient: str = "x0", prediction: str = "conditional", **kwargs):
        super().__init__(objective, **kwargs)
        if gradient not in self.MODES:
            raise ValueError(f"unknown guidance_gradient {gradient!r}; choose {', '.join(self.MODES)}")
        _check_choice("guidance_prediction", prediction, PREDICTIONS)
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
            grad, out, loss, _ = _full_gradient(self, step, blend=community and not step.sigma_frame)
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


def _full_gradient(guider: Guider, step: GuidedStep, noise: torch.Tensor | None = None, *, blend: bool = False):
    """``grad_z`` of the objective (smoothed with *noise*) of the clean estimate of the differentiable prediction
    (``guider.prediction``: ``cfg`` the CFG-combined output, as the SD samplers of Training-Free-Guidance,
    FreeDoM and Universal Guidance; ``conditional`` the text-conditional pass, as the community pipeline);
    with *blend* the loss is scored on ``sqrt(1-ab) x0 + (1 - sqrt(1-ab)) z`` (the community pipeline).
    Returns ``(grad, CFG output, LossOutput, scored x0)``."""
    ab = step.alpha_bar
    with torch.enable_grad():
        z = step.z.detach().requires_grad_(True)
        cfg = guider.prediction == "cfg"
        pred = step.model(z) if cfg else step.model.conditional(z)
        x0 = clean_estimate(z, pred, ab, step.prediction_type)
        scored = (1 - ab).sqrt() * x0 + (1 - (1 - ab).sqrt()) * z if blend else x0
        loss = smoothed_loss(guider.objective, step.decode, scored, step=step.index, generator=step.generator,
                             noise=noise)
        grad = descend(loss.total, z, guider.loss_scale)
    out = pred.detach() if cfg else step.model.combine(step.z, pred.detach())
    return grad, out, loss, x0.detach()


def _clean_descent(guider: Guider, step: GuidedStep, x0: torch.Tensor, *, iterations: int, lr: Callable[[int], float],
                   noise: torch.Tensor | None = None):
    """``iterations`` gradient steps on the clean estimate alone (no UNet backward): ``x0 <- x0 - lr *
    grad_x0 L(x0)``; returns the total change ``Delta0`` and the first ``LossOutput``."""
    moved, first = x0.detach().clone(), None
    for k in range(iterations):
        with torch.enable_grad():
            x = moved.requires_grad_(True)
            loss = smoothed_loss(guider.objective, step.decode, x, step=step.index, generator=step.generator,
                                 noise=noise)
            grad = descend(loss.total, x, guider.loss_scale)
        first = loss if first is None else first
        moved = (moved.detach() - lr(k) * grad).detach()
    return moved - x0.detach(), first


def fold_clean_change(output: torch.Tensor, delta_x0: torch.Tensor, step: GuidedStep) -> torch.Tensor:
    """The model output whose clean estimate at the same ``z`` is moved by *delta_x0*: ``eps' = eps -
    sqrt(ab / (1 - ab)) Delta0`` (Bansal et al.'s backward-guidance fold-back), in the model's parametrisation."""
    ab = step.alpha_bar
    return output + output_correction(-(ab / (1 - ab)).sqrt() * delta_x0, ab, step.prediction_type)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).mean(dim=1).sqrt()


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

    def __init__(self, objective=None, *, step_rule: str | None = None, prediction: str = "cfg", **kwargs):
        super().__init__(objective, **kwargs)
        step_rule = step_rule or self.default_step_rule
        _check_choice("step_rule", step_rule, STEP_RULES)
        _check_choice("guidance_prediction", prediction, PREDICTIONS)
        self.step_rule, self.prediction = step_rule, prediction
        self._pending: dict[int, tuple] = {}

    def model_output(self, step: GuidedStep):
        if not self.active(step.index):
            return step.model(step.z), None
        grad, out, loss, _ = _full_gradient(self, step)
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
            reference = _rms(eps[0] - eps[1])
        self._pending = {step.index: (grad, reference)}
        return out, loss

    def step_size(self, step: GuidedStep, sample: torch.Tensor, grad: torch.Tensor, reference=None):
        """``zeta_t`` per image (see the class); *reference*: ``|L|`` (``loss``) or the CFG update's rms (``cfg``)."""
        s = self.strength(step.index)
        if self.step_rule == "scale":
            return s
        if self.step_rule == "loss":
            return s / _per_image(reference.to(grad.dtype).clamp_min(1e-12), grad)
        if self.step_rule == "relative":
            update = (step.to_vp(sample) - step.z).flatten(1).norm(dim=1)
            return s * _per_image(update / grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
        return s * _per_image(reference.to(grad.dtype) / _rms(grad).clamp_min(1e-12), grad)

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
        delta, loss = _clean_descent(self, step, x0, iterations=1, lr=lambda _: c)
        self._delta = {step.index: delta}
        return out, loss

    def sample_correction(self, step: GuidedStep, sample: torch.Tensor) -> torch.Tensor:
        delta = self._delta.pop(step.index, None)
        if delta is None:
            return sample
        return sample + step.to_sample(step.next_alpha_bar.sqrt() * delta)


class _BackwardOptions:
    """Shared options of guiders with a clean-estimate optimisation (UGD backward guidance, TFG's mu)."""

    def _init_backward(self, backward_steps: int, backward_lr: float, backward_schedule: str) -> None:
        if int(backward_steps) < 0:
            raise ValueError(f"backward_steps is {backward_steps}; use 0 (none) or more")
        if not math.isfinite(backward_lr):
            raise ValueError(f"backward_lr is {backward_lr}; give a finite number")
        _check_choice("backward_schedule", backward_schedule, SCHEDULES)
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


class UGDGuider(_BackwardOptions, CLIPGuider):
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
            delta, first = _clean_descent(self, step, x0, iterations=self.backward_steps,
                                          lr=lambda _: self.backward_rate(step.index))
            guided, loss = fold_clean_change(guided, delta, step), loss if loss is not None else first
        return guided, loss

    def describe(self) -> dict[str, Any]:
        on = self.enabled
        return {**super().describe(), "backward_steps": self.backward_steps if on else 0,
                "backward_lr": self.backward_lr if on else None}


class TFGGuider(_BackwardOptions, Guider):
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

    def __init__(self, objective=None, *, backward_steps: int = 0, backward_lr: float = 0.1,
                 backward_schedule: str = "constant", smoothing: float = 0.0, smoothing_schedule: str = "constant",
                 smoothing_samples: int = 1, prediction: str = "cfg", **kwargs):
        super().__init__(objective, **kwargs)
        self._init_backward(backward_steps, backward_lr, backward_schedule)
        _check_choice("guidance_prediction", prediction, PREDICTIONS)
        self.prediction = prediction
        if not (math.isfinite(smoothing) and smoothing >= 0):
            raise ValueError(f"smoothing is {smoothing}; use 0 (none) or a positive noise std")
        _check_choice("smoothing_schedule", smoothing_schedule, SMOOTHING_SCHEDULES)
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
            grad, out, loss, x0 = _full_gradient(self, step, noise)     # Delta_0 starts from the x0 scored here
            delta_t = -rho * grad
        else:
            out = step.model(step.z)
            x0 = clean_estimate(step.z, out, step.alpha_bar, step.prediction_type)
        delta_0 = None
        if self.backward_on:
            delta_0, first = _clean_descent(self, step, x0, iterations=self.backward_steps,
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


GUIDERS: dict[str, type[Guider]] = {"none": Guider, "clip": CLIPGuider, "dps": DPSGuider, "mpgd": MPGDGuider,
                                    "freedom": FreeDoMGuider, "ugd": UGDGuider, "tfg": TFGGuider}


def register_guider(name: str, cls: type[Guider]) -> None:
    """Make guider *cls* selectable as ``--guider name``."""
    GUIDERS[name] = cls


def guided_scheduler_step(guider: Guider, step: GuidedStep, scheduler, sample: torch.Tensor, timestep, *,
                          to_scheduler: Callable[[torch.Tensor], torch.Tensor] | None = None, **step_kwargs):
    """One step of the sampling loop: ``guider.model_output`` -> ``scheduler.step`` (the output first converted by
    *to_scheduler*: rectified flow's velocity) -> ``guider.sample_correction``. Returns ``(sample, clean
    estimate of the corrected output, LossOutput or None)``."""
    out, loss = guider.model_output(step)
    x0 = clean_estimate(step.z, out, step.alpha_bar, step.prediction_type)
    if to_scheduler is not None:
        out = to_scheduler(out)
    sample = scheduler.step(out, timestep, sample, **step_kwargs, return_dict=False)[0]
    return guider.sample_correction(step, sample), x0, loss


def make_guider(name: str, objective, **kwargs) -> Guider:
    """Guider *name* with its keyword arguments; a one-line error for an unknown name."""
    if name not in GUIDERS:
        raise ValueError(f"unknown guider {name!r}; choose from {', '.join(sorted(GUIDERS))}")
    return GUIDERS[name](objective, **kwargs)


def setup_guider(guider: Guider, num_steps: int, tables) -> None:
    """``guider.setup(num_steps, tables)``; a user's guider whose ``setup`` takes only the step count still works."""
    import inspect

    params = [p for p in inspect.signature(guider.setup).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        guider.setup(num_steps, tables)
    else:
        guider.setup(num_steps)


__all__ = ["Guider", "CLIPGuider", "DPSGuider", "MPGDGuider", "FreeDoMGuider", "UGDGuider", "TFGGuider",
           "GuidedStep", "Denoiser", "GUIDERS", "register_guider", "make_guider", "guided_steps",
           "setup_guider", "guided_scheduler_step", "SCHEDULES", "PREDICTIONS", "STEP_RULES", "schedule_weights",
           "smoothed_loss", "fold_clean_change", "HALF_LOSS_SCALE"]
