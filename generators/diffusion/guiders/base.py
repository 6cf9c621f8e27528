"""What every guider shares: the step a guider sees (:class:`GuidedStep`, :class:`Denoiser`), the base
:class:`Guider` (its window, strength, schedule and self-recurrence, and the options it owns), and the
gradient helpers the rules are built from.

The sampling loop of every diffusion backend is: prepare -> for each step: model output ->
``guider.model_output(step)`` (the guider's correction) -> ``scheduler.step``. A :class:`Guider`
owns its step window (``start`` / ``end`` / ``every``), its strength and the correction; it reads
noise levels from the run's :class:`~generators.diffusion.tables.NoiseTables` (built once), never from
the scheduler's step-index state, so it may evaluate the same step twice.

A guider may also correct the sample that ``scheduler.step`` returns (:meth:`Guider.sample_correction`,
for rules stated on ``x_{t-1}``: DPS, FreeDoM, MPGD, TFG) and ask the loop to repeat a step
(:meth:`Guider.repeats`: self-recurrence; the loop re-noises ``x_{t-1}`` back to ``x_t`` with
:func:`~generators.diffusion.tables.renoise` and restores the scheduler's step state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ...base import option
from ..tables import clean_estimate, output_correction

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


@dataclass
class GuiderOptions:
    """The options every guider reads: its strength, window, schedule, self-recurrence and the prediction it differentiates."""

    clip_guidance_scale: float | None = option(None, "strength of the guider's correction at each guided step (0: "
                                                     "off; default: the guider's own under --guider-defaults)",
                                               flag="--clip-guidance-scale")
    guidance_start: float = option(0.0, "first fraction of the schedule that gets guidance (0-1)", minimum=0,
                                   maximum=1)
    guidance_end: float = option(1.0, "fraction of the schedule where guidance stops (0-1)", minimum=0, maximum=1)
    guidance_every: int = option(1, "guide every k-th step inside the window", minimum=1)
    guidance_prediction: str | None = option(None, "guiders that backprop through the UNet: cfg (the CFG-combined "
                                                   "output, as TFG's, FreeDoM's and UGD's SD samplers) or "
                                                   "conditional (the text-conditional pass only: cheaper; the "
                                                   "community pipeline's)", choices=PREDICTIONS)
    guidance_schedule: str | None = option(None, "guidance strength over the guided steps: constant, increasing "
                                                 "(alpha_t) or decreasing (1 - alpha_t), mean 1 (TFG's schedules)",
                                           choices=SCHEDULES)
    recurrence: int = option(1, "self-recurrence: run each guided step K times, re-noising back in between "
                                "(any guider; schedulers ddim, euler, euler_a)", minimum=1)


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
    #: the options this class adds (a dataclass of ``option(...)`` fields); a guider reads those of its whole MRO
    Options: ClassVar[type | None] = GuiderOptions

    @classmethod
    def from_settings(cls, objective, settings) -> "Guider":
        """This guider for a run: its options read from *settings* (the sd backend's, which hold every
        registered guider's options) by :meth:`settings_kwargs`."""
        return cls(objective, **cls.settings_kwargs(settings))

    @classmethod
    def settings_kwargs(cls, s) -> dict[str, Any]:
        """The constructor's keyword arguments from the options in settings *s*; subclasses add their own."""
        kwargs = dict(scale=s.clip_guidance_scale, start=s.guidance_start, end=s.guidance_end, every=s.guidance_every)
        # passed only when set, so a user's guider with the older base signature still works
        kwargs.update({k: v for k, v in (("recurrence", s.recurrence), ("schedule", s.guidance_schedule))
                       if v != {"recurrence": 1, "schedule": "constant"}[k]})
        return kwargs

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
        check_choice("guidance_schedule", schedule, SCHEDULES)
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


def check_choice(what: str, value: str, choices) -> None:
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


def full_gradient(guider: Guider, step: GuidedStep, noise: torch.Tensor | None = None, *, blend: bool = False):
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


def clean_descent(guider: Guider, step: GuidedStep, x0: torch.Tensor, *, iterations: int, lr: Callable[[int], float],
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


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).mean(dim=1).sqrt()
