"""Scheduler-agnostic CLIP guidance for diffusion sampling: noise levels, clean estimates, corrections.

Every Stable Diffusion scheduler feeds the UNet a variance-preserving input
``z = scale_model_input(x, t) = c_in * x`` with ``z = sqrt(ab) * x0 + sqrt(1 - ab) * eps``:

- VP schedulers (DDIM, PNDM, DPM-Solver++, UniPC) keep ``x = z`` (``c_in = 1``) and ``ab`` is
  ``alphas_cumprod[t]`` at the integer timestep ``t``;
- sigma schedulers (Euler, Euler ancestral, LMS) keep ``x = x0 + sigma * eps`` and divide it by
  ``c_in = 1 / sqrt(1 + sigma^2)``, so ``ab = c_in^2`` (their timesteps may be floats).

Which of the two holds is read off ``scale_model_input`` itself, never off the scheduler class.
CLIP guidance is then a correction of the model output (``eps``, ``v`` or ``x0``), which every
scheduler's own ``step`` consumes: classifier guidance in the form of Dhariwal & Nichol 2021
(eq. 14, ``eps' = eps + sqrt(1 - ab) * grad_z loss``), the rule of the diffusers community
"CLIP guided Stable Diffusion" pipeline and of Disco Diffusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoiseTables:
    """The noise level of every step of one run, built once by :func:`noise_tables`.

    ``alpha_bars[i]`` is ``ab`` of the VP model input at run step ``i`` (a float32 tensor on the
    device), read from the scheduler's own tables (``alphas_cumprod`` at the timestep, or
    ``1 / (1 + sigma^2)`` for sigma schedulers), never from its step-index state, so a guider may
    evaluate the same step twice.
    """

    sigma_frame: bool                     # True: x = x0 + sigma*eps (c_in < 1); False: x = z
    alpha_bars: torch.Tensor              # [num steps], float32, on the device
    next_alpha_bars: torch.Tensor | None = None   # ``ab`` of the sample that step i's ``scheduler.step`` returns
    # rectified flow (:func:`flow_tables`): the sample is ``x = scale * z``; step i's and the next sample's scale
    sample_scales: torch.Tensor | None = None
    next_sample_scales: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None    # rectified flow: the scheduler's sigma t of each step
    next_sigmas: torch.Tensor | None = None   # rectified flow: sigma of the sample step i returns

    def alpha_bar(self, index: int) -> torch.Tensor:
        """``ab`` at run step *index* as a 0-dim float32 tensor on the device (no host sync)."""
        return self.alpha_bars[index]

    def next_alpha_bar(self, index: int) -> torch.Tensor:
        """``ab`` of the sample after run step *index* (1 for a noise-free final sample)."""
        if self.next_alpha_bars is None:
            raise ValueError("these noise tables have no levels after each step; build them with noise_tables()")
        return self.next_alpha_bars[index]

    def step_alphas(self) -> torch.Tensor:
        """``alpha_t = ab_t / ab_{t-1}`` of every step (DDPM's per-step alpha, in ``(0, 1]``)."""
        return (self.alpha_bars / self.next_alpha_bars).clamp(max=1.0)

    def __len__(self) -> int:
        return len(self.alpha_bars)


def check_scheduler(scheduler) -> None:
    """Fail early, with a fix, for a scheduler CLIP guidance cannot read a noise level from."""
    name = type(scheduler).__name__
    if getattr(scheduler, "alphas_cumprod", None) is None or not hasattr(scheduler, "scale_model_input"):
        raise ValueError(f"scheduler {name} has no DDPM noise schedule (alphas_cumprod); use --scheduler "
                         "ddim, pndm, dpm++, euler, euler_a, lms or unipc")
    prediction = getattr(scheduler.config, "prediction_type", None)
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"scheduler {name} predicts {prediction!r}; CLIP guidance supports "
                         f"{', '.join(PREDICTION_TYPES)} models (SD 1.x/2.x, SDXL) and rectified-flow SD3/FLUX; "
                         "pick another --sd model")


def noise_tables(scheduler, timesteps: torch.Tensor, device: str | torch.device = "cpu", *,
                 begin_index: int = 0) -> NoiseTables:
    """Noise levels of the run's *timesteps* (after ``set_timesteps``; *begin_index*: where img2img starts).

    Whether the scheduler works in the sigma frame is read off ``scale_model_input`` of a copy of the
    scheduler (the scheduler itself keeps its state), never off its class.
    """
    import copy

    check_scheduler(scheduler)
    name = type(scheduler).__name__
    device = torch.device(device)
    if len(timesteps) == 0:
        raise ValueError("the run has no denoising steps; raise --steps (or --strength with --init-image)")
    probe = copy.deepcopy(scheduler)
    c_in = float(probe.scale_model_input(torch.ones(()), timesteps[0]))
    if not math.isfinite(c_in) or not 0.0 < c_in <= 1.0:
        raise ValueError(f"scheduler {name} scales the model input by {c_in}; guidance cannot read its "
                         "noise level; use --scheduler ddim, pndm, dpm++, euler, euler_a, lms or unipc")
    if c_in < 1.0:
        sigmas = torch.as_tensor(scheduler.sigmas).detach().double().cpu()
        index = [begin_index + i for i in range(len(timesteps))]
        if index[-1] >= len(sigmas):
            raise ValueError(f"scheduler {name} has {len(sigmas)} noise levels for {len(timesteps)} steps; "
                             "use another --scheduler")
        alpha_bars = (1.0 / (1.0 + sigmas[index] ** 2)).float()
        after = [min(k + 1, len(sigmas) - 1) for k in index]       # sigmas end with the final level (0)
        next_alpha_bars = (1.0 / (1.0 + sigmas[after] ** 2)).float()
        return NoiseTables(sigma_frame=True, alpha_bars=alpha_bars.to(device), next_alpha_bars=next_alpha_bars.to(device))
    table = scheduler.alphas_cumprod.detach().float().cpu()
    values = [float(t) for t in timesteps]
    for t in values:
        if t != round(t) or not 0 <= t < len(table):
            raise ValueError(f"scheduler {name} uses timestep {t}, which is not an index into its "
                             f"{len(table)}-step noise schedule; use another --scheduler")
    alpha_bars = table[[int(round(t)) for t in values]].to(device)
    return NoiseTables(sigma_frame=False, alpha_bars=alpha_bars,
                       next_alpha_bars=_vp_next_levels(scheduler, values, table).to(device))


def flow_tables(scheduler, timesteps: torch.Tensor, device: str | torch.device = "cpu") -> NoiseTables:
    """Noise levels of a rectified-flow run (``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``):
    ``x_t = (1-t) x0 + t eps`` with ``t`` the scheduler's sigma is the VP latent ``z = x_t / r`` scaled by
    ``r = sqrt((1-t)^2 + t^2)``, with ``ab = (1-t)^2 / r^2`` (floored at ``FLOW_MIN_ALPHA_BAR``)."""
    from .families import FLOW_MIN_ALPHA_BAR

    name = type(scheduler).__name__
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or len(timesteps) == 0 or len(sigmas) < len(timesteps) + 1:
        raise ValueError(f"scheduler {name} has no flow-matching sigmas for {len(timesteps)} steps; use the "
                         "model's own FlowMatchEulerDiscreteScheduler (--scheduler auto)")
    t = torch.as_tensor(sigmas).detach().double().cpu()[: len(timesteps) + 1]

    def levels(v):
        scale = ((1 - v) ** 2 + v ** 2).sqrt()
        return ((1 - v) ** 2 / scale ** 2).clamp(min=FLOW_MIN_ALPHA_BAR, max=1.0).float(), scale.float()

    ab, scale = levels(t[:-1])
    next_ab, next_scale = levels(t[1:])
    return NoiseTables(sigma_frame=False, alpha_bars=ab.to(device), next_alpha_bars=next_ab.to(device),
                       sample_scales=scale.to(device), next_sample_scales=next_scale.to(device),
                       sigmas=t[:-1].float().to(device), next_sigmas=t[1:].float().to(device))


def _vp_next_levels(scheduler, timesteps: list[float], table: torch.Tensor) -> torch.Tensor:
    """``ab`` after each step of a VP scheduler: DDIM's own rule (``t - T // n``, then
    ``final_alpha_cumprod``) where the scheduler has it, else the next timestep's level (1 after the last)."""
    final = getattr(scheduler, "final_alpha_cumprod", None)
    n = getattr(scheduler, "num_inference_steps", None)
    out = []
    for i, t in enumerate(timesteps):
        if final is not None and n:
            prev = int(round(t)) - scheduler.config.num_train_timesteps // n
            out.append(float(table[prev]) if prev >= 0 else float(final))
        else:
            out.append(float(table[int(round(timesteps[i + 1]))]) if i + 1 < len(timesteps) else 1.0)
    return torch.tensor(out, dtype=torch.float32)


def renoise(sample: torch.Tensor, tables: NoiseTables, index: int, generator: torch.Generator) -> torch.Tensor:
    """Self-recurrence: take the sample that step *index* produced back to step *index*'s noise level.

    VP frame: ``x_t = sqrt(a) x_{t-1} + sqrt(1 - a) eps`` with ``a = ab_t / ab_{t-1}`` (the forward
    process from ``t-1`` to ``t``: Bansal et al.'s self-recurrence, FreeDoM's time-travel); sigma frame: ``x_t = x_{t-1} +
    sqrt(sigma_t^2 - sigma_{t-1}^2) eps``; rectified flow (from ``t'`` to ``t``): ``x_t = (1-t)/(1-t') x_{t'} +
    sqrt(t^2 - ((1-t) t' / (1-t'))^2) eps``. Both keep the marginal ``z_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps``.
    The noise is drawn from *generator* (the run's objective stream), so the sampler's own stream is untouched.
    """
    ab, ab_next = tables.alpha_bar(index).double(), tables.next_alpha_bar(index).double()
    noise = torch.randn(sample.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(sample.device)
    if tables.sigmas is not None:       # rectified flow from t' to t: the same marginal, x_t = (1-t) x0 + t eps
        t, before = tables.sigmas[index].double(), tables.next_sigmas[index].double()
        keep = (1 - t) / (1 - before)
        return keep.float() * sample + (t ** 2 - (keep * before) ** 2).clamp(min=0).sqrt().float() * noise
    if tables.sigma_frame:
        extra = ((1 - ab) / ab - (1 - ab_next) / ab_next).clamp(min=0).sqrt()
        return sample + extra.float() * noise
    a = (ab / ab_next).clamp(max=1.0)
    return a.sqrt().float() * sample + (1 - a).sqrt().float() * noise


def clean_estimate(z: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from the VP input ``z`` and the model output (eps, v of Salimans & Ho 2022, or x0 itself)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (z - s * output) / a
    if prediction_type == "v_prediction":
        return a * z - s * output
    return output


def output_correction(delta_eps: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The change of the model output (in its own parametrization) equal to ``delta_eps`` at fixed ``z``."""
    if prediction_type == "epsilon":
        return delta_eps
    if prediction_type == "v_prediction":                   # eps = sqrt(1-ab) z + sqrt(ab) v
        return delta_eps / alpha_bar.sqrt()
    return -delta_eps * ((1 - alpha_bar) / alpha_bar).sqrt()  # x0 = (z - sqrt(1-ab) eps) / sqrt(ab)


def clip_gradient(z: torch.Tensor, output: torch.Tensor | None, alpha_bar: torch.Tensor, prediction_type: str, *,
                  decode: Callable[[torch.Tensor], torch.Tensor], loss_fn: Callable, step: int,
                  generator: torch.Generator, model: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  loss_scale: float = 1.0):
    """``grad_z`` of the CLIP loss of the decoded clean estimate, and the ``LossOutput``.

    ``model=None`` ("x0" mode): the model output is held constant in its v form, so
    ``x0 = sqrt(ab) z - sqrt(1-ab) v`` and ``grad_z = sqrt(ab) * grad_x0``: the gradient is taken at the
    clean estimate without a UNet backward (as Manifold Preserving Guided Diffusion, He et al. 2024,
    does), with the Jacobian ``dx0/dz`` replaced by ``sqrt(ab) I``, its exact value for Gaussian
    latents. (Holding eps constant instead would give ``I / sqrt(ab)``, ~200x larger at the noisiest
    steps.) ``model`` given ("full" mode): the UNet is re-run on ``z`` with gradients and the loss is
    backpropagated through it, as the diffusers community CLIP-guided pipeline does; ``output`` is
    then not used (pass ``None``).
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        if model is None:
            v = output.detach() if prediction_type == "v_prediction" else \
                _as_v(z.detach(), output.detach(), alpha_bar, prediction_type)
            x0 = alpha_bar.sqrt() * z - (1 - alpha_bar).sqrt() * v
        else:
            x0 = clean_estimate(z, model(z), alpha_bar, prediction_type)
        loss = loss_fn(decode(x0), step=step, generator=generator)
        (grad,) = torch.autograd.grad(loss.total * loss_scale, z)
    if loss_scale != 1.0:
        grad = torch.nan_to_num(grad / loss_scale, nan=0.0, posinf=0.0, neginf=0.0)
    return grad, loss


def _as_v(z: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """v = sqrt(ab) eps - sqrt(1-ab) x0, from either output type."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x0 = clean_estimate(z, output, alpha_bar, prediction_type)
    eps = (z - a * x0) / s
    return a * eps - s * x0
