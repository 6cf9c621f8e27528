"""Steer a diffusion model through its starting noise: optimise it (ReNO, DNO) or search it (best-of-N,
zero-order search).

The diffusion model is a fixed renderer: starting noise ``z`` -> ``render_steps`` sampler steps -> VAE
decode -> images in ``[0, 1]``, differentiable end to end. VQGAN+CLIP's idea with a far better prior.

- ``method="gradient"`` (default; Eyring et al. 2024, "ReNO: Enhancing One-step Text-to-Image Models
  through Reward-based Noise Optimization"): the shared latent-optimisation loop on ``z`` with ReNO's
  recipe -- SGD with Nesterov momentum 0.9, learning rate 5, gradient-norm clipping at 0.1 per image, 50
  iterations, the best iterate kept by the objective, and the noise-norm regulariser
  ``reg_weight * (½‖z‖² − (d−1)·log‖z‖)`` (in float32), whose minimum is at ``‖z‖ = √(d−1)``, so the
  noise stays Gaussian-typical. Multi-step renderers can checkpoint the UNet calls (Tang et al. 2024,
  "Tuning-Free Alignment of Diffusion Models with Direct Noise Optimization", DNO: backpropagate through
  the whole chain), and with ``step_noises`` the noise that DDIM adds at each step (``eta`` > 0; DNO's
  eta = 1 sampler) is optimised too: those noises are the later channels of the optimised tensor, each
  under its own noise-norm regulariser.
- ``method="best-of-n"``: N starting noises, keep the best by the objective (which need not be
  differentiable); ``method="zero-order"`` (Ma et al. 2025, "Inference-Time Scaling for Diffusion
  Models beyond Scaling Denoising Steps"): neighbours of a pivot noise at ``search_radius``, keep the
  best, move the pivot when a neighbour beats it. Both spend exactly ``budget`` renderer calls.
- ``reapply_model``: render the best noise once more with another (larger or multi-step) pipeline, as
  ReNO's multi-apply does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from ..base import GenerationResult, Generator, StepCallback, StepInfo, option, seed_generator
from ..optimise import OptimiseSettings, check_settings, optimise
from .families import family_of
from .pipeline import (FLOW_SCHEDULER, SCHEDULER_CHOICES, cached_pipeline, cfg_combine, check_model_path,
                       check_scheduler_name, choose_scheduler, image_size, prepare_models, sd_config_option,
                       vae_decode)

METHODS = ("gradient", "best-of-n", "zero-order")
# Schedulers the renderer differentiates through: single-step updates whose state set_timesteps resets.
DIFFERENTIABLE = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler",
                  "DDPMScheduler", FLOW_SCHEDULER)


@dataclass
class NoiseSettings(OptimiseSettings):
    """Options of the ``noise`` backend (each becomes a CLI option and a config-file key)."""

    iterations: int = option(50, "optimisation steps (gradient method)", metavar="N", minimum=0)
    learning_rate: float = option(5.0, "optimiser learning rate (ReNO: 5 with SGD)", flag="--lr", above=0)
    optimizer: str = option("SGD", "torch optimiser (SGD runs with Nesterov momentum 0.9, as ReNO)",
                            aliases=["--optimiser"])
    grad_clip: float | None = option(0.1, "clip the gradient norm of each image's noise to this value, as ReNO "
                                          "(none: no clipping)",
                                     above=0)
    keep_best: bool = option(True, "return the best iterate by the objective, not the last one")
    sd_model: str = option("stabilityai/sd-turbo", "diffusion model rendering the noise (SD 1.x/2.x, SDXL e.g. "
                           "SDXL-Turbo, SD3, FLUX.1 e.g. schnell): Hub id, local diffusers folder, or one "
                           ".safetensors/.ckpt file", flag="--sd", path="model")
    sd_config: str | None = sd_config_option()
    render_steps: int = option(1, "sampling steps from the noise to the image (1 for turbo models)", minimum=1)
    scheduler: str = option("default", "sampler of the renderer ('default' or 'auto': the checkpoint's own)",
                            flag="--scheduler", choices=SCHEDULER_CHOICES)
    cfg_scale: float = option(0.0, "classifier-free guidance in the renderer (1 or less: none, as turbo models)",
                              flag="--cfg-scale")
    negative_prompt: str = option("", "negative conditioning text (with --cfg-scale above 1)",
                                  flag="--negative-prompt")
    reg_weight: float = option(0.01, "weight of the noise-norm regulariser ½‖z‖² − (d−1)·log‖z‖ (0: off)",
                               minimum=0)
    method: str = option("gradient", "gradient (ReNO noise optimisation), best-of-n or zero-order (search)",
                         choices=METHODS)
    budget: int | None = option(None, "search: renderer calls to spend (default: --iterations)", minimum=1)
    search_first: int = option(0, "gradient method: first render N random noises and optimise from the best one "
                                  "by the objective (N more renderer calls; 0: start from the seed's noise)",
                               metavar="N", minimum=0)
    search_radius: float = option(0.5, "zero-order: distance of the neighbours from the pivot, relative to "
                                       "the noise's norm", above=0)
    neighbours: int = option(4, "zero-order: neighbours tried around the pivot per round", minimum=1)
    checkpointing: bool = option(False, "gradient checkpointing through the UNet calls (less memory for "
                                        "multi-step renderers, same gradient)")
    step_noises: bool = option(False, "DNO: optimise (or search) the noise that a stochastic DDIM renderer adds at "
                                      "each step too, not only the starting noise (--scheduler ddim, --eta above 0)")
    eta: float = option(1.0, "DDIM's eta with --step-noises (1: the fully stochastic sampler, as DNO)", minimum=0,
                        requires="step_noises")
    reapply_model: str | None = option(None, "render the best noise once more with this pipeline (ReNO's "
                                             "multi-apply)", metavar="MODEL", path="model")
    reapply_steps: int = option(4, "sampling steps of --reapply-model", minimum=1)
    width: int = option(0, "image width in pixels, a multiple of 8 (0: the model's native size)", minimum=0)
    height: int = option(0, "image height in pixels, a multiple of 8 (0: the model's native size)", minimum=0)
    num_images: int = option(1, "images optimised together, each from its own noise", flag="--num-images",
                             minimum=1)
    layout_sketch: str = option("", "render from a sketch of the layout (SDEdit; SD 1.x/2.x): the background and a "
                                    "blob per subject box in the prompt's colour words, noised by the optimised or "
                                    "searched noise to --strength; boxes as 'circle:0,0,0.5,1;...', or auto")
    strength: float = option(0.8, "--layout-sketch: how much of the render schedule re-noises the sketch (0-1]",
                             above=0, maximum=1, requires="layout_sketch")


def toy_preset() -> dict:
    """This backend's part of ``--preset toy``: the toy few-step model when it exists, else the toy SD."""
    from ..runs.presets import toyworld_weights

    turbo = toyworld_weights("sd_turbo", check=False) if _has_toy("sd_turbo") else None
    if turbo is not None:
        return {"sd_model": str(turbo), "render_steps": 1, "iterations": 30, "learning_rate": 5.0}
    return {"sd_model": str(toyworld_weights("sd", check=True)), "render_steps": 4, "scheduler": "ddim",
            "cfg_scale": 5.0, "iterations": 30, "learning_rate": 5.0}


def _has_toy(name: str) -> bool:
    try:
        from toyworld.paths import MODELS, weights_dir

        return name in MODELS and weights_dir(name, check=False).joinpath("model_index.json").is_file()
    except ImportError:
        return False


def noise_norm_regulariser(z: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * (½‖z‖² − (d−1)·log‖z‖)`` per image (float32): the negative log-density of the norm of a
    d-dimensional standard Gaussian, smallest at ``‖z‖ = √(d−1)``. Its minimum value is subtracted (a
    constant: the gradient is ReNO's), so the logged regulariser is 0 for a typical noise and grows away from it."""
    flat = z.float().flatten(1)
    d = flat.shape[1]
    norm = flat.norm(dim=1)
    minimum = 0.5 * (d - 1) - 0.5 * (d - 1) * math.log(d - 1)
    return weight * (0.5 * norm ** 2 - (d - 1) * norm.log() - minimum)


class NoiseGenerator(Generator):
    """Optimise or search the starting noise of a diffusers Stable Diffusion pipeline against the objective."""

    name = "noise"
    Settings = NoiseSettings
    presets = {"toy": toy_preset}
    needs_objective = True
    resumable = True

    @classmethod
    def check(cls, s: NoiseSettings, device=None) -> None:
        cls._check_options(s)
        check_model_path(s.sd_model)
        if s.reapply_model:
            check_model_path(s.reapply_model)

    @staticmethod
    def _check_options(s: NoiseSettings) -> None:
        check_settings(s)
        if s.method not in METHODS:
            raise ValueError(f"unknown method {s.method!r}; choose from {', '.join(METHODS)}")
        if s.method == "gradient" and s.iterations < 1:
            raise ValueError("iterations is 0: the gradient method needs at least 1 (or use --method best-of-n)")
        if s.search_first and s.method != "gradient":
            raise ValueError(f"--search-first is for the gradient method; --method {s.method} spends --budget instead")
        if s.budget is not None and s.budget < 1:
            raise ValueError(f"budget is {s.budget}; give at least 1 renderer call")
        check_scheduler_name(s.scheduler)
        if s.step_noises and s.scheduler != "ddim":
            raise ValueError(f"--step-noises needs the DDIM sampler, whose step takes its noise as an input; "
                             f"add --scheduler ddim (not {s.scheduler})")
        if s.step_noises and s.render_steps < 2:
            raise ValueError("--step-noises with 1 render step has no step noise to optimise; use --render-steps 2 "
                             "or more")
        if s.layout_sketch:
            from .layout_sketch import check_layout_sketch

            check_layout_sketch(s.layout_sketch)
            if s.step_noises:
                raise ValueError("--layout-sketch skips the first render steps, whose noises --step-noises would "
                                 "optimise; drop one of them")
            if int(s.render_steps * s.strength) < 1:
                raise ValueError(f"--strength {s.strength} with --render-steps {s.render_steps} leaves no render "
                                 f"step; use a strength of at least {1 / s.render_steps:.3g} or more render steps")
        if s.step_noises and not s.eta > 0:
            raise ValueError("--step-noises with --eta 0 adds no noise at any step; use --eta 1 (DNO) or above 0")

    def __init__(self, settings: NoiseSettings | None = None, *, device=None, precision=None, pipeline=None,
                 reapply_pipeline=None):
        super().__init__(settings, device=device, precision=precision)
        s = self.settings
        self.check(s) if pipeline is None else self._check_options(s)
        self.pipe = pipeline if pipeline is not None else cached_pipeline(s.sd_model, dtype=self.dtype,
                                                                          config=s.sd_config)
        self.family = family_of(self.pipe)
        if s.layout_sketch and self.family.name != "sd":
            raise ValueError(f"--layout-sketch (img2img) supports SD 1.x/2.x renderers; {self.family.label} renders "
                             "from noise only: drop --layout-sketch")
        self.scheduler = self._scheduler(self.pipe, s.scheduler)
        self._prepare_models(self.pipe)
        self.width, self.height = image_size(self.family, s.width, s.height)
        self.reapply = None
        if s.reapply_model or reapply_pipeline is not None:
            self.reapply = reapply_pipeline if reapply_pipeline is not None else cached_pipeline(
                s.reapply_model, dtype=self.dtype)
            self.reapply_scheduler = self._scheduler(self.reapply, "default", differentiable=False)
            if s.layout_sketch and family_of(self.reapply).name != "sd":
                raise ValueError(f"--layout-sketch (img2img) needs an SD 1.x/2.x --reapply-model too; "
                                 f"{family_of(self.reapply).label} renders from noise only: drop one of them")
            self._prepare_models(self.reapply)

    # -- set-up ------------------------------------------------------------------------------------
    @staticmethod
    def _scheduler(pipe, name: str, differentiable: bool = True):
        scheduler = choose_scheduler(pipe, family_of(pipe), name, auto=None, fresh=True)
        if differentiable and type(scheduler).__name__ not in DIFFERENTIABLE:
            raise ValueError(f"the noise backend cannot differentiate through {type(scheduler).__name__} (it keeps a "
                             f"history between steps); use --scheduler ddim, euler or euler_a")
        return scheduler

    def _prepare_models(self, pipe) -> None:
        prepare_models(pipe, family_of(pipe), self.dtype)
        for module in (pipe.vae, *family_of(pipe).compute_modules()):
            module.to(self.device)

    def latent_shape(self) -> tuple[int, int, int, int]:
        """The optimised tensor: the starting noise, with ``--step-noises`` followed along the channel axis by
        the noise of each render step (DNO)."""
        shape = list(self.family.latent_shape(self.settings.num_images, self.height, self.width))
        shape[1] *= self._noise_count()
        return tuple(shape)

    def _noise_count(self) -> int:
        """1 (the starting noise), plus one per render step with ``--step-noises``."""
        return 1 + (self.settings.render_steps if self.settings.step_noises else 0)

    def starting_noise(self, z: torch.Tensor) -> torch.Tensor:
        """The starting-noise part of the optimised tensor."""
        return z[:, : z.shape[1] // self._noise_count()]

    # -- the renderer -------------------------------------------------------------------------------
    def _embeddings(self, pipe, objective, batch: int):
        """The renderer's conditioning (a :class:`~generators.diffusion.families.Conditioning`) and the prompt."""
        s, family = self.settings, family_of(pipe)
        prompt = objective.conditioning_text(0) if objective is not None else ""
        with torch.no_grad():
            conditioning = family.encode(prompt, s.negative_prompt, batch, family.uses_cfg(s.cfg_scale), self.device,
                                         height=self.height, width=self.width)
        return conditioning, prompt

    @torch.no_grad()
    def sketch_latents(self, pipe, prompt: str) -> torch.Tensor | None:
        """The ``--layout-sketch`` of *prompt* encoded by *pipe*'s VAE (the mode of its posterior, scaled), or
        ``None`` (no sketch, or a layout with no box: render from noise)."""
        s = self.settings
        if not s.layout_sketch:
            return None
        from .layout_sketch import layout_sketch

        picture = layout_sketch(s.layout_sketch, prompt, self.width, self.height)
        if picture is None:
            return None
        pixels = pipe.image_processor.preprocess(picture).to(self.device, pipe.vae.dtype)
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        return latents.float()

    def make_renderer(self, pipe, scheduler, conditioning, steps: int, seed: int, start: torch.Tensor | None = None):
        """``render(z)``: starting noise -> images ``[B,3,H,W]`` (unclamped, differentiable in ``z``). With
        *start* (clean latents: the layout sketch) the render is img2img: *start* noised by ``z`` to the
        ``strength`` of the schedule, then the remaining steps (the slice diffusers' img2img keeps)."""
        s, family = self.settings, family_of(pipe)
        vae, cfg = pipe.vae, conditioning.cfg

        def model(x, t):
            out = family.predict(torch.cat([x, x]) if cfg else x, t, conditioning.both)
            return cfg_combine(out, s.cfg_scale) if cfg else out

        own_noises = s.step_noises and pipe is self.pipe     # DNO: the step noises are part of z

        def render(z: torch.Tensor) -> torch.Tensor:
            # resets the scheduler's state
            timesteps = family.set_timesteps(scheduler, steps, self.device, height=self.height, width=self.width)
            noise = torch.Generator().manual_seed(seed)             # an ancestral sampler's noise: same each call
            extra = pipe.prepare_extra_step_kwargs(noise, 0.0) if not family.flow else {}
            step_noises = []
            if own_noises:
                z, *step_noises = z.chunk(self._noise_count(), dim=1)
                extra = {"eta": s.eta}
            elif s.step_noises:
                z = self.starting_noise(z)                          # another pipeline re-renders the start only
            if start is None:
                latents = z * family.noise_scale(scheduler)
            else:
                first = steps - min(int(steps * s.strength), steps)
                timesteps = timesteps[first * scheduler.order:]
                if hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(first * scheduler.order)
                latents = scheduler.add_noise(start.to(z.dtype), z, timesteps[:1])
            for i, t in enumerate(timesteps):
                if step_noises:
                    extra["variance_noise"] = step_noises[i]
                x_in = latents if family.flow else scheduler.scale_model_input(latents, t)
                if s.checkpointing and torch.is_grad_enabled():
                    from torch.utils.checkpoint import checkpoint

                    out = checkpoint(model, x_in, t, use_reentrant=False)
                else:
                    out = model(x_in, t)
                latents = scheduler.step(out, t, latents, **extra, return_dict=False)[0]
            return vae_decode(vae, family, latents, dtype=self.dtype, height=self.height, width=self.width)

        return render

    def compile_targets(self) -> list[torch.nn.Module]:
        return [self.pipe.vae.decoder]

    # -- the run ------------------------------------------------------------------------------------
    def generate(self, objective, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        s = self.settings
        started = time.perf_counter()
        init_gen = seed_generator(seed, "init")
        z = torch.randn(self.latent_shape(), generator=init_gen).to(self.device)
        conditioning, prompt = self._embeddings(self.pipe, objective, s.num_images)
        sketch = self.sketch_latents(self.pipe, prompt)
        render = self.make_renderer(self.pipe, self.scheduler, conditioning, s.render_steps, seed, sketch)
        decode = lambda latent: render(latent).detach().clamp(0, 1).float().cpu()  # noqa: E731
        if s.method == "gradient":
            out = self._search_then_optimise(z, render, objective, seed, callback, decode, init_gen)
        else:
            out = self._search(z, render, objective, seed, callback, init_gen)
        best, info = out["latents"], out["info"]
        with torch.no_grad():
            images = decode(best)
            if self.reapply is not None:
                conditioning2, _ = self._embeddings(self.reapply, objective, s.num_images)
                again = self.make_renderer(self.reapply, self.reapply_scheduler, conditioning2, s.reapply_steps, seed,
                                           self.sketch_latents(self.reapply, prompt) if sketch is not None else None)
                images = again(best).clamp(0, 1).float().cpu()
                info["reapplied_with"] = {"model": s.reapply_model or "(pipeline given)", "steps": s.reapply_steps}
        start = self.starting_noise(best)
        info.update({"method": s.method, "prompt": prompt, "render_steps": s.render_steps,
                     "scheduler": type(self.scheduler).__name__, "latent_shape": list(z.shape),
                     "step_noises": s.render_steps if s.step_noises else 0,
                     **({"layout_sketch": s.layout_sketch, "strength": s.strength} if sketch is not None else {}),
                     "noise_norm": start.float().flatten(1).norm(dim=1).cpu().tolist(),
                     "noise_norm_typical": math.sqrt(start[0].numel()), "seconds": time.perf_counter() - started})
        return GenerationResult(images=images, losses=out["losses"], info=info, interrupted=out["interrupted"],
                                steps_done=out["steps_done"], stopped_at=out["stopped_at"])

    def _search_then_optimise(self, z, render, objective, seed, callback, decode, init_gen) -> dict:
        """The gradient method, after ``search_first`` best-of-N renders (not repeated on resume): the
        progress counts both, the search steps first."""
        s = self.settings
        first = s.search_first if (self.checkpoint is None or self.checkpoint.resume is None) else 0
        if first < 1:
            return self._optimise(z, render, objective, seed, callback, decode)
        total = first + s.iterations
        searched = self._search(z, render, objective, seed, callback, init_gen, method="best-of-n", budget=first,
                                total=total)
        record = {"renders": searched["steps_done"], "losses": searched["losses"],
                  "best_loss": searched["info"].pop("best_loss")}
        if searched["interrupted"] or searched["stopped_at"] is not None:     # ended during the search
            searched["info"]["search_first"] = record
            return searched
        shifted = None if callback is None else (
            lambda info: callback(dataclasses.replace(info, step=info.step + first, total=total)))
        out = self._optimise(searched["latents"].clone(), render, objective, seed, shifted, decode)
        out["info"]["renderer_calls"] += searched["steps_done"]
        out["info"]["search_first"] = record
        return out

    def _optimise(self, z, render, objective, seed, callback, decode) -> dict:
        s = self.settings
        extra = {"momentum": 0.9, "nesterov": True} if str(s.optimizer).lower() == "sgd" else {}
        count = self._noise_count()
        regulariser = (lambda latent, step: {"noise_norm": sum(noise_norm_regulariser(part, s.reg_weight)
                                                               for part in latent.chunk(count, dim=1))}) \
            if s.reg_weight else None
        result = optimise(z.requires_grad_(True), render, objective, optimizer=s.optimizer, lr=s.learning_rate,
                          schedule=s.lr_schedule, steps=s.iterations, regulariser=regulariser, callback=callback,
                          generator=seed_generator(seed, "objective"), decode=decode, keep_best=s.keep_best,
                          grad_clip=s.grad_clip, optimizer_kwargs=extra, checkpoint=self.checkpoint,
                          grad_scaler=self.grad_scaler())
        info = {"renderer_calls": result.steps_done, "best_step": result.best_step, "best_loss": result.best_loss}
        return {"latents": z.detach(), "losses": result.losses, "steps_done": result.steps_done,
                "stopped_at": result.stopped_at, "interrupted": result.interrupted, "info": info}

    @torch.no_grad()
    def _search(self, z, render, objective, seed, callback, init_gen, *, method=None, budget=None,
                total=None) -> dict:
        """Best-of-N or zero-order search, exactly ``budget`` renderer calls (fewer only if stopped)."""
        s = self.settings
        method = method or s.method
        budget = budget or s.budget or s.iterations or 1
        total = total or budget
        objective_gen = seed_generator(seed, "objective")
        pivot = z.clone()
        best_noise, best_loss = z.clone(), None
        losses, calls, stopped_at, interrupted = [], 0, None, False
        candidates_from_pivot: list[torch.Tensor] = []

        def score(noise):
            loss = objective(render(noise), step=calls, generator=objective_gen).per_image.float()
            return loss

        try:
            while calls < budget:
                if calls == 0:
                    candidate = z
                elif method == "best-of-n":
                    candidate = torch.randn(z.shape, generator=init_gen).to(self.device)
                else:
                    if not candidates_from_pivot:        # a new round of neighbours around the pivot
                        norm = pivot.flatten(1).norm(dim=1).view(-1, *[1] * (pivot.dim() - 1))
                        for _ in range(s.neighbours):
                            step = torch.randn(z.shape, generator=init_gen).to(self.device)
                            step = step / step.flatten(1).norm(dim=1).view_as(norm) * norm * s.search_radius
                            candidates_from_pivot.append(pivot + step)
                    candidate = candidates_from_pivot.pop(0)
                loss = score(candidate)
                calls += 1
                if best_loss is None:
                    best_loss = loss.clone()
                else:
                    better = loss < best_loss
                    mask = better.view(-1, *[1] * (z.dim() - 1))
                    best_noise = torch.where(mask, candidate, best_noise)
                    best_loss = torch.where(better, loss, best_loss)
                if method == "zero-order" and not candidates_from_pivot:
                    pivot = best_noise.clone()                  # move the pivot to the best seen
                losses.append(float(loss.mean()))
                if callback is not None:
                    keep = callback(StepInfo(step=calls - 1, total=total, latents=candidate,
                                             decode=lambda c=candidate: render(c).clamp(0, 1).float().cpu(),
                                             loss=loss.mean(), parts={}))
                    if keep is False:
                        stopped_at = calls - 1
                        break
        except KeyboardInterrupt:
            interrupted = True
        info = {"renderer_calls": calls, "budget": budget,
                "best_loss": None if best_loss is None else best_loss.cpu().tolist()}
        return {"latents": best_noise, "losses": losses, "steps_done": calls, "stopped_at": stopped_at,
                "interrupted": interrupted, "info": info}

    @classmethod
    def run_length(cls, settings) -> int | None:
        if settings.method != "gradient":
            return settings.budget or settings.iterations
        return settings.iterations + settings.search_first


__all__ = ["NoiseGenerator", "NoiseSettings", "noise_norm_regulariser", "METHODS"]
