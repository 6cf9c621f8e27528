"""Every guidance rule against a line-by-line transcription of its reference code (issue 30).

One guided step of clipsteer's guider (``model_output`` -> the diffusers scheduler's ``step`` ->
``sample_correction``, the sampling loop's own :func:`generators.diffusion.guiders.guided_scheduler_step`) is
compared with the reference rule written out below from the reference code, in float64, on a toy
deterministic eps-model with a conditional and an unconditional branch and real diffusers schedulers
with Stable Diffusion's betas, with and without classifier-free guidance. The measure is the
difference relative to the size of the reference's guidance update (``reference - unguided step``),
so a rule that moved the sample by the wrong amount cannot hide in the sample's own size.

References (read at these commits; line numbers are theirs):

- YWolfeee/Training-Free-Guidance @ f8d17f3: ``methods/base.py`` (DDIM algebra, L53-109),
  ``methods/dps.py`` L27-37, ``methods/mpgd.py`` L30-43, ``methods/ugd.py`` L27-53,
  ``methods/freedom.py`` L39-54, ``methods/tfg.py`` L18-40 and L96-129,
  ``diffusion/stable_diffusion.py`` L117-129 (the guiders get the CFG-combined eps).
- vvictoryuki/FreeDoM ``SD_style/ldm/models/diffusion/ddim.py`` L223-273 (``p_sample_ddim_conditional``).
- arpitbansal297/Universal-Guided-Diffusion ``stable-diffusion-guided/ldm/models/diffusion/ddim_with_grad.py``
  L129-168 (forward guidance through the CFG-combined output).
- huggingface/diffusers @ 2d460a9 ``examples/community/clip_guided_stable_diffusion.py``: ``cond_fn`` L114-176,
  the conditional text embeddings for the gradient pass in ``__call__`` (``text_embeddings.chunk(2)[1]``).
- ExplainableML/ReNO ``training/trainer.py`` L99-129 (one image per run: loss + norm regulariser, backward,
  ``clip_grad_norm_``, optimiser step).

The toy eps-model is not a UNet, but the rules only ever see a function ``z -> eps`` and a decoder.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from generators.diffusion.guiders import Denoiser, GuidedStep, guided_scheduler_step, make_guider, setup_guider
from generators.diffusion.tables import noise_tables
from guidance.objective import LossOutput, Objective

DT = torch.float64
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS, INDEX = 20, 8          # a 20-step run; step 8 is compared
CFG = 4.0                     # the CFG weight of the "with CFG" cases (1: none)
TOL = 1e-5
SEED = 5                      # the objective stream's seed (TFG's smoothing noise)


# -- the toy world of the comparison -----------------------------------------------------------------
class ToyEps:
    """A small deterministic nonlinear eps-model: ``eps(z, t, c) = tanh(W z + b_c + t / 1000) + 0.1 z``."""

    def __init__(self, channels: int = 4):
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(channels, channels, generator=g, dtype=DT) / 2
        self.text = {"cond": torch.randn(channels, generator=g, dtype=DT),
                     "uncond": torch.randn(channels, generator=g, dtype=DT)}

    def __call__(self, z: torch.Tensor, t, which: str) -> torch.Tensor:
        mixed = torch.einsum("oc,bchw->bohw", self.weight, z) + self.text[which].view(1, -1, 1, 1)
        return torch.tanh(mixed + float(t) / 1000) + 0.1 * z


class Model:
    """The eps-model at one timestep as the SD samplers call it: its two branches and their CFG combination."""

    def __init__(self, t, cfg: float):
        self.eps, self.t, self.cfg = ToyEps(), t, cfg

    def cond(self, z):
        return self.eps(z, self.t, "cond")

    def uncond(self, z):
        return self.eps(z, self.t, "uncond")

    def __call__(self, z):
        """The CFG-combined eps (Training-Free-Guidance diffusion/stable_diffusion.py L117-129)."""
        if self.cfg <= 1:
            return self.cond(z)
        u = self.uncond(z)
        return u + self.cfg * (self.cond(z) - u)

    def denoiser(self) -> Denoiser:
        cfg = self.cfg > 1
        return Denoiser(guided=self, conditional=self.cond,
                        combine=(lambda z, c: self.uncond(z) + self.cfg * (c - self.uncond(z))) if cfg else
                        (lambda z, c: c), unconditional=self.uncond if cfg else None)


DECODER = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
TARGET = torch.tensor([0.9, 0.2, 0.1], dtype=DT).view(1, 3, 1, 1)


def decode(latents: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(torch.einsum("oc,bchw->bohw", DECODER, latents))


class Colour(Objective):
    """A deterministic smooth loss: the mean squared distance of every pixel from one colour."""

    def forward(self, images, *, step=0, generator=None):
        per_image = ((images - TARGET) ** 2).mean(dim=(1, 2, 3))
        return LossOutput(total=per_image.sum(), per_image=per_image)


def log_p(latents: torch.Tensor) -> torch.Tensor:
    """The references' guidance target: log p = -loss, per image."""
    return -Colour()(decode(latents)).per_image


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x).sum(), x)[0]


def make_scheduler(name: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lms": LMSDiscreteScheduler}[name]
    extra = dict(clip_sample=False, set_alpha_to_one=False) if name == "ddim" else {}
    scheduler = cls(**SD_BETAS, steps_offset=1, **extra)
    scheduler.set_timesteps(STEPS)
    return scheduler


class Case:
    """One guided step: the scheduler, the sample ``x`` in its frame, the VP input ``z`` and the noise levels."""

    def __init__(self, scheduler_name: str, cfg: float, batch: int = 2):
        self.name, self.cfg = scheduler_name, cfg
        self.scheduler = make_scheduler(scheduler_name)
        self.t = self.scheduler.timesteps[INDEX]
        g = torch.Generator().manual_seed(2)
        z = torch.randn(batch, 4, 6, 6, generator=g, dtype=DT)
        if scheduler_name == "ddim":     # the references' own tables (Training-Free-Guidance stable_diffusion.py L52-56)
            table = self.scheduler.alphas_cumprod.double()
            self.ab = table[int(self.t)]
            prev = int(self.t) - 1000 // STEPS
            self.ab_prev = table[prev] if prev >= 0 else self.scheduler.final_alpha_cumprod.double()
            self.x = z
        else:                            # sigma frame: x = x0 + sigma eps, ab = 1 / (1 + sigma^2)
            sigmas = self.scheduler.sigmas.double()
            self.sigma = sigmas[INDEX]
            self.ab, self.ab_prev = 1 / (1 + sigmas[INDEX] ** 2), 1 / (1 + sigmas[INDEX + 1] ** 2)
            self.x = z / self.ab.sqrt()
        self.model = Model(self.t, cfg)

    @property
    def z(self) -> torch.Tensor:
        """The VP latent ``sqrt(ab) x0 + sqrt(1-ab) eps`` (the UNet's input)."""
        return self.x if self.name == "ddim" else self.x * self.ab.sqrt()

    def from_vp(self, z_prev: torch.Tensor) -> torch.Tensor:
        """A VP ``z_{t-1}`` in the scheduler's frame (Euler with eps: exactly DDIM with eta 0 in that frame)."""
        return z_prev if self.name == "ddim" else z_prev / self.ab_prev.sqrt()

    def scheduler_step(self, eps: torch.Tensor, x: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        scheduler = copy.deepcopy(self.scheduler)
        x = self.x if x is None else x
        scheduler.scale_model_input(x, self.t)     # sets the step index of sigma schedulers
        return scheduler.step(eps, self.t, x, **kwargs).prev_sample

    def unguided(self, **kwargs) -> torch.Tensor:
        return self.scheduler_step(self.model(self.z), **kwargs)

    def clipsteer(self, guider: str, step_kwargs=None, **options) -> torch.Tensor:
        """clipsteer's guided step: the guider, the run's noise tables, the sampling loop's step function."""
        scheduler = copy.deepcopy(self.scheduler)
        tables = noise_tables(scheduler, scheduler.timesteps)
        rule = make_guider(guider, Colour(), **options)
        setup_guider(rule, STEPS, tables)
        z = scheduler.scale_model_input(self.x, self.t)
        step = GuidedStep(index=INDEX, timestep=self.t, z=z, alpha_bar=tables.alpha_bar(INDEX),
                          prediction_type="epsilon", model=self.model.denoiser(), decode=decode,
                          generator=torch.Generator().manual_seed(SEED), next_alpha_bar=tables.next_alpha_bar(INDEX),
                          sigma_frame=tables.sigma_frame)
        sample, _, _ = guided_scheduler_step(rule, step, scheduler, self.x, self.t, **(step_kwargs or {}))
        return sample


def relative(ours: torch.Tensor, reference: torch.Tensor, unguided: torch.Tensor) -> float:
    """``|ours - reference| / |reference - unguided|``: the error relative to the reference's guidance update."""
    update = (reference - unguided).norm()
    assert update > 1e-8, "the reference's update is zero: the comparison would say nothing"
    return float((ours - reference).norm() / update)


# -- transcriptions of the references (VP frame, z_t -> z_{t-1}) ---------------------------------------------
def ddim_from_eps(z, eps, ab, ab_prev):
    """Training-Free-Guidance methods/base.py L75-98 (DDIM eq. 12) with eta 0."""
    x0 = (z - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    return ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps


def ddim_from_x0(z, x0, ab, ab_prev):
    """Training-Free-Guidance methods/base.py L53-72: the eps of (z, x0), then DDIM."""
    return ddim_from_eps(z, (z - ab ** 0.5 * x0) / (1 - ab) ** 0.5, ab, ab_prev)


def clean(model, z, ab):
    """x0 of the (CFG-combined) eps: Training-Free-Guidance methods/base.py L131-135 (clip_x0 off, as its SD script)."""
    return (z - (1 - ab) ** 0.5 * model(z)) / ab ** 0.5


def reference_dps(case, zeta, *, normalise: bool):
    """Training-Free-Guidance methods/dps.py L27-37 (normalise: the division by |log p| of L37; without it, the
    rule of methods/freedom.py L44-54 with constant rho, one recurrence)."""
    model, z, ab, ab_prev = case.model, case.z, case.ab, case.ab_prev
    x_prev = ddim_from_eps(z, model(z), ab, ab_prev)
    guidance = grad_of(lambda zt: log_p(clean(model, zt, ab)), z)
    if normalise:
        guidance = guidance / log_p(clean(model, z, ab)).abs().view(-1, 1, 1, 1)
    return x_prev + zeta * guidance


def reference_mpgd(case, c):
    """Training-Free-Guidance methods/mpgd.py L30-43."""
    model, z, ab, ab_prev = case.model, case.z, case.ab, case.ab_prev
    eps = model(z)
    x0 = (z - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    x0 = x0 + c * grad_of(log_p, x0)
    xt = (1 - ab) ** 0.5 * eps + ab ** 0.5 * x0
    return ddim_from_x0(xt, x0, ab, ab_prev)


def reference_ugd(case, s, backward_steps, backward_lr):
    """Training-Free-Guidance methods/ugd.py L27-53 (one recurrence; the backward step size is its own here,
    where ugd.py reuses guidance_strength): forward guidance through the UNet, the backward descent from the
    *unguided* x0, both folded into eps."""
    model, z, ab, ab_prev = case.model, case.z, case.ab, case.ab_prev
    eps = model(z)
    x0 = (z - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    guidance = grad_of(lambda zt: log_p(clean(model, zt, ab)), z)
    eps_hat = eps - s * guidance * (1 - ab) ** 0.5
    moved = x0.clone()
    for _ in range(backward_steps):
        moved = moved + backward_lr * grad_of(log_p, moved)
    eps_hat = eps_hat - (ab / (1 - ab)) ** 0.5 * (moved - x0)
    return ddim_from_eps(z, eps_hat, ab, ab_prev)


def reference_tfg(case, rho, mu, iterations, mc_eps):
    """Training-Free-Guidance methods/tfg.py L96-129 (one recurrence), its smoothed log p of L18-40
    (``logsumexp`` over the Monte-Carlo draws ``mc_eps`` minus ``log K``)."""
    model, z, ab, ab_prev = case.model, case.z, case.ab, case.ab_prev

    def tilde_log_p(x0):
        k = mc_eps.shape[0]
        outs = log_p((x0[None] + mc_eps).reshape(-1, *x0.shape[1:])).reshape(k, x0.shape[0])
        return torch.logsumexp(outs, dim=0) - math.log(k)

    delta_t = rho * grad_of(lambda zt: tilde_log_p(clean(model, zt, ab)), z)
    x0 = clean(model, z, ab)
    new_x0 = x0.clone()
    for _ in range(iterations):
        new_x0 = new_x0 + mu * grad_of(tilde_log_p, new_x0)
    alpha_t = ab / ab_prev
    return ddim_from_x0(z, x0, ab, ab_prev) + delta_t / alpha_t ** 0.5 + (new_x0 - x0) * ab_prev ** 0.5


def reference_freedom(case, factor, noise):
    """FreeDoM SD_style/ldm/models/diffusion/ddim.py L227-273, one pass (no time-travel), with our loss as its
    energy: rho = factor * rms(w (eps_c - eps_u)) / rms(grad) per image (its L263, 0.2 there), the DDPM posterior
    step c1 x0 + c2 x + c3 noise (L266-270), then x_prev - rho * grad (L273)."""
    model, x, a_t, a_prev = case.model, case.z, case.ab, case.ab_prev
    out = []
    for i in range(x.shape[0]):          # FreeDoM runs one image at a time (its rms is over the whole batch)
        xi = x[i:i + 1]
        e_t = model(xi)
        correction = e_t - model.uncond(xi)                 # = w * (eps_c - eps_u)
        norm_grad = grad_of(lambda xt: -log_p(clean(model, xt, a_t)), xi)
        rho = (correction ** 2).mean().sqrt() / (norm_grad ** 2).mean().sqrt() * factor
        pred_x0 = clean(model, xi, a_t)
        c1 = a_prev.sqrt() * (1 - a_t / a_prev) / (1 - a_t)
        c2 = (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)
        c3 = ((1 - a_prev) * (1 - a_t / a_prev) / (1 - a_t)).sqrt()
        out.append(c1 * pred_x0 + c2 * xi + c3 * noise[i:i + 1] - rho * norm_grad)
    return torch.cat(out)


def reference_community(case, s):
    """diffusers examples/community/clip_guided_stable_diffusion.py ``cond_fn`` L114-176: the gradient through the
    conditional pass (``__call__``'s ``text_embeddings.chunk(2)[1]``); DDIM/PNDM/DPM++: the loss on the blend
    ``sqrt(1-ab) x0 + (1 - sqrt(1-ab)) x_t`` and ``eps - sqrt(1-ab) * grads``; LMS: the loss on ``x - sigma eps``
    and the latents moved by ``grads * sigma^2`` before the scheduler's step with the unchanged eps."""
    latents = case.x
    noise_pred_original = case.model(case.z)
    if case.name == "ddim":
        ab = case.ab

        def loss(lat):
            pred = (lat - (1 - ab) ** 0.5 * case.model.cond(lat)) / ab ** 0.5
            fac = (1 - ab).sqrt()
            return -s * log_p(pred * fac + lat * (1 - fac))

        grads = -grad_of(loss, latents)
        return case.scheduler_step(noise_pred_original - (1 - ab).sqrt() * grads)
    sigma = case.sigma

    def loss(lat):
        return -s * log_p(lat - sigma * case.model.cond(lat / (sigma ** 2 + 1) ** 0.5))

    grads = -grad_of(loss, latents)
    return case.scheduler_step(noise_pred_original, latents + grads * sigma ** 2)


# -- the comparisons ------------------------------------------------------------------------------------------
CFGS = [pytest.param(1.0, id="no-cfg"), pytest.param(CFG, id="cfg")]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("paper", [False, True], ids=["scale", "paper-1/|L|"])
def test_dps_is_tfg_dps_py(scheduler, cfg, paper):
    case = Case(scheduler, cfg)
    ours = case.clipsteer("dps", scale=7.0, step_rule="loss" if paper else "scale")
    reference = case.from_vp(reference_dps(case, 7.0, normalise=paper))
    assert relative(ours, reference, case.unguided()) <= TOL


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_mpgd_is_tfg_mpgd_py(scheduler, cfg):
    case = Case(scheduler, cfg)
    ours = case.clipsteer("mpgd", scale=30.0)
    assert relative(ours, case.from_vp(reference_mpgd(case, 30.0)), case.unguided()) <= TOL


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_ugd_full_is_tfg_ugd_py_with_the_backward_descent_from_the_unguided_x0(scheduler, cfg):
    case = Case(scheduler, cfg)
    ours = case.clipsteer("ugd", scale=300.0, gradient="full", backward_steps=2, backward_lr=20.0)
    reference = case.from_vp(reference_ugd(case, 300.0, 2, 20.0))
    assert relative(ours, reference, case.unguided()) <= TOL


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_tfg_is_tfg_py(scheduler, cfg, smoothing):
    case = Case(scheduler, cfg)
    samples = 3 if smoothing else 1
    ours = case.clipsteer("tfg", scale=8.0, schedule="increasing", backward_steps=2, backward_lr=15.0,
                          backward_schedule="increasing", smoothing=smoothing, smoothing_schedule="decreasing",
                          smoothing_samples=samples)
    # Training-Free-Guidance methods/freedom.py / tfg.py get_rho, get_mu: strength * schedule[t] * len / sum over
    # every step of the run, 'increase' = alpha_t = ab_t / ab_{t-1}; get_std 'decrease': sigma * sqrt(1 - ab_t)
    tables = noise_tables(case.scheduler, case.scheduler.timesteps)
    alphas = tables.step_alphas().double()
    weight = float(alphas[INDEX] * len(alphas) / alphas.sum())
    std = smoothing * float((1 - case.ab).sqrt())
    noise = torch.randn((samples, *case.z.shape), generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    mc_eps = std * noise.to(DT) if smoothing else torch.zeros((1, *case.z.shape), dtype=DT)
    reference = case.from_vp(reference_tfg(case, 8.0 * weight, 15.0 * weight, 2, mc_eps))
    assert relative(ours, reference, case.unguided()) <= TOL


def test_freedom_paper_step_is_freedoms_sd_sampler():
    case = Case("ddim", CFG)
    noise = torch.randn(case.z.shape, generator=torch.Generator().manual_seed(9), dtype=DT)
    kwargs = dict(eta=1.0, variance_noise=noise)
    ours = case.clipsteer("freedom", step_kwargs=kwargs, scale=0.2, step_rule="cfg")
    reference = reference_freedom(case, 0.2, noise)
    assert relative(ours, reference, case.unguided(**kwargs)) <= TOL


def test_freedom_paper_correction_on_euler():
    """The same correction (``- rho grad``, FreeDoM's rho) after an Euler step."""
    case = Case("euler", CFG)
    ours = case.clipsteer("freedom", scale=0.2, step_rule="cfg")
    step = ddim_from_eps(case.z, case.model(case.z), case.ab, case.ab_prev)
    zero = torch.zeros_like(case.z)
    correction = reference_freedom(case, 0.2, zero) - reference_freedom(case, 0.0, zero)
    assert relative(ours, case.from_vp(step + correction), case.unguided()) <= TOL


def test_freedom_paper_step_needs_cfg():
    case = Case("ddim", 1.0)
    with pytest.raises(ValueError, match="needs classifier-free guidance") as err:
        case.clipsteer("freedom", scale=0.2, step_rule="cfg")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "lms"])
def test_clip_community_is_the_community_pipeline(scheduler, cfg):
    case = Case(scheduler, cfg)
    ours = case.clipsteer("clip", scale=40.0, gradient="community", prediction="conditional")
    assert relative(ours, reference_community(case, 40.0), case.unguided()) <= TOL


# -- ReNO: noise optimisation, one image at a time ------------------------------------------------------------
def reno_latents(latent, render, iterations, lr, clip, reg_weight):
    """ExplainableML/ReNO training/trainer.py L99-129 for one image: total = reward loss + the norm regulariser
    (L109-118), backward, ``clip_grad_norm_(latents, grad_clip)``, SGD step (training/optim.py: SGD, Nesterov
    momentum 0.9); *iterations* updates."""
    latent = torch.nn.Parameter(latent.clone())
    optimizer = torch.optim.SGD([latent], lr=lr, momentum=0.9, nesterov=True)
    d = latent[0].numel()
    for _ in range(iterations):
        optimizer.zero_grad()
        total = Colour()(render(latent)).total
        norm = torch.linalg.vector_norm(latent)
        total = total + reg_weight * (0.5 * norm ** 2 - (d - 1) * torch.log(norm))
        total.backward()
        torch.nn.utils.clip_grad_norm_(latent, clip)
        optimizer.step()
    return latent.detach()


def test_noise_optimisation_clips_each_image_as_reno():
    from generators.diffusion.noise import noise_norm_regulariser
    from generators.optimise import optimise

    g = torch.Generator().manual_seed(3)
    start = torch.randn(3, 4, 6, 6, generator=g, dtype=DT) * torch.tensor([1.0, 2.0, 0.5], dtype=DT).view(3, 1, 1, 1)
    render = decode
    ours = start.clone().requires_grad_(True)
    optimise(ours, render, Colour(), optimizer="SGD", lr=5.0, steps=3, grad_clip=0.1,
             regulariser=lambda latent, step: noise_norm_regulariser(latent, 0.01),
             optimizer_kwargs={"momentum": 0.9, "nesterov": True})
    for i in range(3):
        reference = reno_latents(start[i:i + 1], render, 3, 5.0, 0.1, 0.01)
        moved = (reference - start[i:i + 1]).norm()
        assert float((ours.detach()[i:i + 1] - reference).norm() / moved) <= TOL, i
