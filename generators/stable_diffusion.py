"""Diffusion models through diffusers (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1), with an objective steering every
guided denoising step.

Each model family is an adapter of :mod:`generators.families` (conditioning, starting latents,
timesteps, the denoiser call and the VAE's input, all with the diffusers pipeline's own methods); the
loop below is the same for every family. Rectified-flow families (SD3, FLUX) are handed to the guiders
in the variance-preserving frame with their clean estimate as a ``"sample"`` prediction, and the
corrected clean estimate goes back to ``FlowMatchEulerDiscreteScheduler`` as a velocity.

At a guided step the clean latent is predicted from the current latent and the (CFG) model
output at the scheduler's own noise level, decoded by the VAE (or a tiny ``AutoencoderTiny``)
with gradients, scored by the ``CLIPLoss``, and the gradient is turned into a correction of the
model output that the scheduler's ``step`` consumes (see :mod:`generators.sd_guidance`). So the
same code serves DDIM, PNDM, DPM-Solver++, Euler, Euler ancestral, LMS and UniPC, for eps-,
v- and x0-prediction checkpoints, and with ``clip_guidance_scale=0`` the loop is exactly
``StableDiffusionPipeline.__call__``.

The correction itself belongs to a guider (``--guider``, :mod:`generators.guiders`: ``clip``, ``dps``,
``mpgd``, ``freedom``, ``ugd``, ``tfg``). The loop per step: ``guider.model_output(step)`` ->
``scheduler.step`` -> ``guider.sample_correction``; with self-recurrence (``--recurrence K``) it then
restores the scheduler's step state, re-noises the sample back to the step's noise level
(:func:`~generators.sd_guidance.renoise`, the run's noise tables, the objective's random stream) and
runs the step again, K times in all (DDIM, Euler, Euler ancestral; schedulers that keep a history of
model outputs are refused).

Speed: every weight is frozen, the CFG UNet output is reused, and by default
(``guidance_gradient="x0"``) the gradient stops at the clean estimate, so a guided step costs
one UNet forward plus a VAE-decoder forward/backward and the CLIP passes. ``"full"`` and
``"community"`` backpropagate through the UNet as the diffusers community CLIP-guided pipeline does, but
run the text-conditional UNet pass once (with gradients) and reuse it for CFG, where that pipeline
runs it twice. Guiders that differentiate the CFG-combined output (``--guidance-prediction cfg``, the
default of dps, freedom, ugd and tfg, as their reference SD samplers) backpropagate through both CFG passes.

Precision: the UNet and text encoder run in the requested dtype; the latents, the scheduler
arithmetic, the VAE weights and the guidance gradient stay float32. In half precision the guidance decode
runs under autocast (:func:`decoder_dtype`: not in fp16 for a VAE that asks for float32), the final
decode in float32. When a CLIP encoder is fp16 the loss is scaled by 2**10 for its backward and unscaled
afterwards (non-finite entries are zeroed), so small gradients do not underflow.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import GenerationResult, Generator, StepCallback, StepInfo
from guidance.errors import first_line, load_error, looks_like_path, readable_weights

from .base import option, seed_generator
from .guider_defaults import PROFILES, fill_guider_defaults, profile_summary
from . import attend_excite, layout_guidance  # noqa: F401  (they register their attention steering)
from .guiders import (GUIDERS, PREDICTIONS, SCHEDULES, SMOOTHING_SCHEDULES, STEP_RULES, CLIPGuider,
                      guided_scheduler_step, setup_guider)
from .families import family_class, family_of, pipeline_class_of
from .sd_guidance import check_scheduler, flow_tables, noise_tables, renoise

# name -> diffusers scheduler class name; each is built with ``from_config(pipe.scheduler.config)``.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
GRADIENT_MODES = CLIPGuider.MODES
# Schedulers whose step may be repeated after re-noising (self-recurrence): their step depends only on
# the timestep (DDIM) or on a step index the loop restores (Euler, Euler ancestral). PNDM, LMS,
# DPM-Solver++ and UniPC keep a history of model outputs that a repeated step would corrupt.
RECURRENT_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "euler_a": "EulerAncestralDiscreteScheduler"}
# The rectified-flow models' own sampler: its step depends only on the step index, which the loop restores.
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# --scheduler values: a DDPM sampler by name, "default" (the checkpoint's own), "auto" (dpm++ for the DDPM
# families SD 1.x/2.x and SDXL, the model's own flow-matching Euler for SD3 and FLUX)
SCHEDULER_CHOICES = [*SCHEDULERS, "default", "auto"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Settings:
    """Options of the ``sd`` backend (CLI flags and config keys come from these fields)."""

    sd_model: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5", "diffusion model (SD 1.x/2.x, SDXL, SD3/3.5 "
                           "or FLUX.1, found from the model): Hub id, local diffusers folder, or one "
                           ".safetensors/.ckpt file", flag="--sd", path="model")
    sd_config: str | None = option(None, "for a single-file --sd checkpoint: a local diffusers folder or Hub id "
                                         "holding its configs (needed offline)", flag="--sd-config",
                                         path="model")
    steps: int = option(30, "denoising steps", flag="--steps", minimum=1)
    scheduler: str = option("auto", "sampler ('default': the checkpoint's own; 'auto': dpm++ for SD 1.x/2.x and "
                                    "SDXL, the model's own flow-matching Euler for SD3/FLUX)", flag="--scheduler",
                            choices=SCHEDULER_CHOICES)
    guider: str = option("clip", "how the objective corrects each guided step: " + ", ".join(sorted(GUIDERS)),
                         flag="--guider", choices=sorted(GUIDERS))
    guider_defaults: str = option("clipsteer", "where the guider's unset settings come from: clipsteer (the "
                                               "project's own choices), toy (--preset toy's) or paper (each guider's "
                                               "reference code, docs/guiders.md: " + profile_summary("paper") + ")",
                                  choices=PROFILES)
    clip_guidance_scale: float | None = option(None, "strength of the guider's correction at each guided step (0: "
                                                     "off; default: the guider's own under --guider-defaults)",
                                               flag="--clip-guidance-scale")
    cfg_scale: float = option(7.5, "classifier-free guidance scale (1 or less: no CFG; FLUX: not used)",
                              flag="--cfg-scale")
    flux_guidance: float = option(3.5, "FLUX.1-dev (guidance-distilled): the guidance value the transformer takes "
                                       "as input (schnell has none)", minimum=0)
    prompt: str = option("", "conditioning text for the UNet (empty: the CLIP text prompts with positive weight, "
                             "joined with ', ')", flag="--sd-prompt")
    negative_prompt: str = option("", "negative conditioning text for classifier-free guidance",
                                  flag="--negative-prompt")
    width: int = option(0, "image width in pixels, a multiple of 8 (0: the model's native size)", minimum=0)
    height: int = option(0, "image height in pixels, a multiple of 8 (0: the model's native size)", minimum=0)
    init_image: str | None = option(None, "start from this image (img2img) instead of pure noise",
                                    path="file")
    strength: float = option(0.8, "img2img: how much of the schedule re-noises the init image (0-1]", above=0,
                             maximum=1, requires="init_image")
    num_images: int = option(1, "images generated per prompt (one batch)", flag="--num-images", minimum=1)
    guidance_start: float = option(0.0, "first fraction of the schedule that gets guidance (0-1)", minimum=0,
                                   maximum=1)
    guidance_end: float = option(1.0, "fraction of the schedule where guidance stops (0-1)", minimum=0, maximum=1)
    guidance_every: int = option(1, "guide every k-th step inside the window", minimum=1)
    guidance_gradient: str | None = option(None, "clip/ugd: x0: gradient through the clean-latent estimate with the "
                                                 "UNet output held fixed (fast); full: backprop through the UNet "
                                                 "too; community: the community pipeline's rule exactly (blend, "
                                                 "sigma^2 moves on LMS/Euler)", choices=GRADIENT_MODES)
    guidance_prediction: str | None = option(None, "guiders that backprop through the UNet: cfg (the CFG-combined "
                                                   "output, as TFG's, FreeDoM's and UGD's SD samplers) or "
                                                   "conditional (the text-conditional pass only: cheaper; the "
                                                   "community pipeline's)", choices=PREDICTIONS)
    step_rule: str | None = option(None, "dps/freedom step size: scale, loss (scale/|L|: DPS paper), relative (to the "
                                         "sampler's update: clipsteer's freedom) or cfg (FreeDoM's code: by the CFG "
                                         "update)", choices=STEP_RULES)
    guidance_schedule: str | None = option(None, "guidance strength over the guided steps: constant, increasing "
                                                 "(alpha_t) or decreasing (1 - alpha_t), mean 1 (TFG's schedules)",
                                           choices=SCHEDULES)
    recurrence: int = option(1, "self-recurrence: run each guided step K times, re-noising back in between "
                                "(any guider; schedulers ddim, euler, euler_a)", minimum=1)
    backward_steps: int | None = option(None, "ugd: backward-guidance steps on the clean estimate; tfg: its mu "
                                              "iterations (0: none)", minimum=0)
    backward_lr: float | None = option(None, "ugd/tfg: step size of the clean-estimate optimisation (tfg: mu)")
    backward_schedule: str | None = option(None, "ugd/tfg: schedule of --backward-lr over the guided steps",
                                           choices=SCHEDULES)
    smoothing: float | None = option(None, "tfg: std sigma of the Monte-Carlo smoothing noise on the clean estimate "
                                           "(0: none)", minimum=0)
    smoothing_schedule: str | None = option(None, "tfg: constant or decreasing (sigma * sqrt(1 - ab_t))",
                                            choices=SMOOTHING_SCHEDULES)
    smoothing_samples: int | None = option(None, "tfg: noise draws per Monte-Carlo smoothed objective", minimum=1)
    ddim_eta: float | None = option(None, "DDIM's eta (--scheduler ddim; 0: deterministic, 1: DDPM-like; default: "
                                          "the guider's, 1 for the TFG-family papers)", minimum=0)
    composable: bool = option(False, "composable prompts (Liu et al. 2022): condition on each '|' part of the "
                                     "prompt separately and add their CFG directions, weighted by the parts' "
                                     "weights (negative: NOT)")
    attend_excite: bool = option(False, "Attend-and-Excite (Chefer et al. 2023): before the first steps, move the "
                                        "latents until every subject token has a strong attention peak "
                                        "(UNet models; combines with any --guider)")
    subject_tokens: str = option("", "attend-excite/layout: the subject words (or token positions), comma-separated "
                                     "(default: the last word of each part of the prompt between 'and', commas "
                                     "and relations)")
    excite_scale: float = option(20.0, "attend-excite: step size factor (diffusers' scale_factor)", above=0)
    excite_steps: int = option(25, "attend-excite: the first steps that get its gradient step (diffusers' "
                                   "max_iter_to_alter)", minimum=0)
    excite_thresholds: str = option("0:0.05,10:0.5,20:0.8", "attend-excite: STEP:PEAK pairs: at these steps, refine "
                                                             "until every subject's attention peak reaches PEAK")
    layout: str = option("", "layout guidance (Chen et al. 2024): boxes per subject, 'circle:0,0,0.5,1;square:"
                             "0.5,0,1,1' (x0,y0,x1,y1 fractions), or auto (from the prompt's relation)")
    layout_scale: float = option(30.0, "layout: step size (the reference's loss_scale)", above=0)
    layout_steps: int = option(10, "layout: the first steps that are steered", minimum=0)
    layout_iterations: int = option(5, "layout: gradient steps per steered step, at most", minimum=1)
    layout_threshold: float = option(0.2, "layout: stop a step's iterations once the loss is below this", minimum=0)
    attention_res: int = option(0, "attend-excite/layout: side of the cross-attention maps they read (0: 16, or "
                                   "the UNet's nearest)", minimum=0)
    vae: str | None = option(None, "replace the model's VAE (Hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix "
                                   "for SDXL", path="model")
    tiny_vae: str | None = option(None, "AutoencoderTiny (Hub id or folder, e.g. madebyollin/taesd) that decodes the "
                                        "guidance image (much cheaper than the full VAE)", path="model")
    channels_last: bool = option(True, "run the VAE decoders in channels-last memory format (the SD 1.5 VAE "
                                       "decodes ~20% faster on CPU; --no-channels-last: contiguous)")
    vae_slicing: bool = option(False, "decode the batch one image at a time (less memory)")
    vae_tiling: bool = option(False, "decode in tiles (large images, less memory)")
    attention_slicing: bool = option(False, "sliced attention (less memory; default is PyTorch SDPA)")
    cpu_offload: bool = option(False, "keep models in CPU memory and move each to the GPU when it runs "
                                      "(the pipeline's enable_model_cpu_offload; CUDA only)")

    def __post_init__(self):
        """Settings left ``None`` take the guider's default under ``guider_defaults`` (generators.guider_defaults)."""
        if self.guider in GUIDERS and self.guider_defaults in PROFILES:
            fill_guider_defaults(self, guider=self.guider, profile=self.guider_defaults)


def toy_preset() -> dict:
    """This backend's part of ``--preset toy``: the toy Stable Diffusion pipeline."""
    from .presets import toyworld_weights

    # every guider's strength comes from the "toy" guider defaults (generators.guider_defaults): the clip rule's
    # 500 chosen on the toy tuning prompts (quality.py --prompt-seed 7 --seed-base 10 --prompts 12 --seeds 2, 24
    # images), all three right: scale 100 54.2%, 200 62.5%, 300 70.8%, 500 75.0%, 1000 58.3%; unguided 45.8%;
    # the other guiders' from benchmarks/tune_guiders.py --grid toy-v2
    return {"sd_model": str(toyworld_weights("sd", check=True)), "guider_defaults": "toy"}


class StableDiffusionGenerator(Generator):
    """Stable Diffusion sampling with CLIP guidance injected into the denoising loop (classifier
    guidance of Dhariwal & Nichol 2021 with a CLIP loss, as in the diffusers community CLIP-guided
    pipeline and Disco Diffusion), on top of classifier-free guidance.

    ``pipeline``: an already built ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline`` or ``FluxPipeline`` to use instead of loading ``sd_model`` (its scheduler
    is replaced per ``settings.scheduler`` and its weights are frozen).

    ``generate(clip_loss, seed=, callback=)``: ``clip_loss=None`` or ``clip_guidance_scale=0`` is
    plain diffusers sampling. The UNet is conditioned on ``settings.prompt``, or, when that is empty,
    on the CLIPLoss's positive text prompts at step 0 joined with ", ". The step callback's
    ``StepInfo.decode()`` renders the current clean-image estimate (the final latents after the last
    step); stopping early (callback returns ``False``, or Ctrl-C) returns that estimate.
    ``result.info`` records ``guided_steps`` (step indices), ``num_steps``, ``steps_done``,
    ``timesteps`` and the settings that shaped the run; ``result.losses`` the mean per-image CLIP
    loss of each guided step.
    """

    name = "sd"
    Settings = Settings
    presets = {"toy": toy_preset}

    @classmethod
    def check(cls, settings: Settings, device=None) -> None:
        from guidance import resolve_device

        _check_settings(settings, resolve_device(device))
        check_model_path(settings.sd_model)

    def __init__(self, settings: Settings | None = None, *, device=None, precision=None, pipeline=None):
        super().__init__(settings, device=device, precision=precision)
        s = self.settings
        _check_settings(s, self.device)
        if pipeline is not None:
            self.pipe = pipeline
        elif s.cpu_offload:  # offload hooks stay on a pipeline: never share one
            self.pipe = load_pipeline(s.sd_model, dtype=self.dtype, config=s.sd_config, vae=s.vae)
        else:
            self.pipe = cached_pipeline(s.sd_model, dtype=self.dtype, config=s.sd_config, vae=s.vae)
        pipe = self.pipe
        self.family = family_of(pipe, guidance=s.flux_guidance)
        self.family.check(s.sd_model if pipeline is None else "the pipeline given")
        if s.init_image and self.family.name != "sd":
            raise ValueError(f"--init-image (img2img) supports SD 1.x/2.x models; {self.family.label} samples from "
                             "noise only: drop --init-image")
        pipe.set_progress_bar_config(disable=True)
        # A cached pipeline remembers the scheduler it was loaded with; each run starts from that one.
        default = pipe.__dict__.get("_clipsteer_default_scheduler", pipe.scheduler)
        pipe.scheduler = self._scheduler(default)
        if not self.family.flow:
            check_scheduler(pipe.scheduler)
        check_recurrence(s.recurrence, pipe.scheduler)
        self.vae_scale = int(pipe.vae_scale_factor)
        self.width, self.height = self._size()
        self.tiny_vae = load_tiny_vae(s.tiny_vae, pipe) if s.tiny_vae else None
        self._place_models()
        # Fail now, not mid-run, if the schedule has no readable noise level.
        timesteps, begin = self._timesteps()
        self._tables(timesteps, begin, "cpu")

    # -- set-up --------------------------------------------------------------------------------
    def _scheduler(self, default):
        """The run's scheduler: a DDPM sampler by name (SD, SDXL), or the model's own (``default``; flow models)."""
        name, family = self.settings.scheduler, self.family
        if family.flow:
            if name not in ("auto", "default"):
                raise ValueError(f"--scheduler {name} is a DDPM sampler; {family.label} is a rectified-flow model "
                                 f"sampled with its own {FLOW_SCHEDULER}: use --scheduler auto or default")
            return default
        if name == "default":
            return default
        return _build_scheduler("dpm++" if name == "auto" else name, default.config)

    def _tables(self, timesteps, begin: int, device):
        """The run's noise tables (:func:`~generators.sd_guidance.noise_tables`; rectified flow: ``flow_tables``)."""
        if self.family.flow:
            return flow_tables(self.pipe.scheduler, timesteps, device)
        return noise_tables(self.pipe.scheduler, timesteps, device, begin_index=begin)

    def _size(self) -> tuple[int, int]:
        s = self.settings
        native = self.family.native_size()
        multiple = self.family.size_multiple()
        sizes = []
        for name, value in (("width", s.width), ("height", s.height)):
            value = value or native
            if value <= 0 or value % multiple:
                lower = max(multiple, value // multiple * multiple)
                raise ValueError(f"{name} {value} is not a positive multiple of {multiple} (the VAE works in "
                                 f"{multiple}-pixel blocks); use --{name} {lower} or {lower + multiple}")
            sizes.append(value)
        return sizes[0], sizes[1]

    def _place_models(self) -> None:
        s, pipe = self.settings, self.pipe
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        # The VAE decodes (and carries the guidance gradient) in float32, as diffusers' force_upcast.
        _to_dtype(pipe.vae, torch.float32)
        # Set both ways: a cached pipeline may carry the previous run's choices.
        pipe.enable_attention_slicing() if s.attention_slicing else pipe.disable_attention_slicing()
        for name, on in (("slicing", s.vae_slicing), ("tiling", s.vae_tiling)):
            switch = getattr(pipe.vae, f"{'enable' if on else 'disable'}_{name}", None)
            if switch is not None:
                switch()
        for module in self.family.compute_modules():
            _to_dtype(module, self.dtype)
        if s.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if self.tiny_vae is not None:
            self.tiny_vae.to(self.device, torch.float32).requires_grad_(False).eval()
        layout = torch.channels_last if s.channels_last else torch.contiguous_format
        for vae in (pipe.vae, self.tiny_vae):
            if vae is not None:
                vae.to(memory_format=layout)

    @property
    def execution_device(self) -> torch.device:
        return torch.device(self.pipe._execution_device)

    def _img2img(self):
        """diffusers' img2img pipeline over the same components (for its ``get_timesteps``/``prepare_latents``)."""
        if getattr(self, "_img2img_pipe", None) is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            self._img2img_pipe = StableDiffusionImg2ImgPipeline(**self.pipe.components)
            self._img2img_pipe.set_progress_bar_config(disable=True)
        self._img2img_pipe.scheduler = self.pipe.scheduler
        return self._img2img_pipe

    def _timesteps(self) -> tuple[torch.Tensor, int]:
        """``set_timesteps`` then, for img2img, the slice the img2img pipeline's ``get_timesteps`` keeps;
        returns (timesteps, index of the first one in the scheduler's tables)."""
        s, scheduler = self.settings, self.pipe.scheduler
        if not s.init_image:
            return self.family.set_timesteps(scheduler, s.steps, self.execution_device, height=self.height,
                                             width=self.width), 0
        scheduler.set_timesteps(s.steps, device=self.execution_device)
        if min(int(s.steps * s.strength), s.steps) < 1:
            raise ValueError(f"--strength {s.strength} with --steps {s.steps} leaves no denoising step; "
                             f"use a strength of at least {1 / s.steps:.3g} or more steps")
        timesteps, _ = self._img2img().get_timesteps(s.steps, s.strength, self.execution_device)
        return timesteps, len(scheduler.timesteps) - len(timesteps)

    def conditioning_prompt(self, objective) -> str:
        """``settings.prompt``, or else the objective's conditioning text at step 0."""
        if self.settings.prompt or objective is None:
            return self.settings.prompt
        return objective.conditioning_text(0)

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``[B,3,H,W]`` in ``[0,1]`` with the full VAE (float32, no gradient),
        post-processed by the pipeline's own ``image_processor``."""
        vae = self.pipe.vae
        with torch.no_grad():
            image = vae.decode(self.family.vae_latents(latents, height=self.height, width=self.width),
                               return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def _guidance_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable decode of the clean estimate for the objective (tiny VAE if set), under autocast in
        half precision (see :func:`decoder_dtype`)."""
        from guidance.runtime import autocast

        vae = self.tiny_vae if self.tiny_vae is not None else self.pipe.vae
        with autocast(latents.device, decoder_dtype(vae, self.dtype)):
            image = vae.decode(self.family.vae_latents(latents, height=self.height, width=self.width, vae=vae),
                               return_dict=False)[0]
        return image.float() / 2 + 0.5     # unclamped: objectives clamp; --range-weight sees the overshoot

    def compile_targets(self) -> list[torch.nn.Module]:
        return [vae.decoder for vae in (self.pipe.vae, self.tiny_vae) if vae is not None]

    # -- sampling ------------------------------------------------------------------------------
    def make_guider(self, objective):
        """The guider of ``settings.guider`` with this backend's window and strength settings."""

        from .guiders import GUIDERS, make_guider

        s = self.settings
        base = dict(scale=s.clip_guidance_scale, start=s.guidance_start, end=s.guidance_end, every=s.guidance_every)
        # passed only when set, so a user's guider with the older base signature still works
        base.update({k: v for k, v in (("recurrence", s.recurrence), ("schedule", s.guidance_schedule))
                     if v != {"recurrence": 1, "schedule": "constant"}[k]})
        own = dict(gradient=s.guidance_gradient, prediction=s.guidance_prediction, step_rule=s.step_rule,
                   backward_steps=s.backward_steps, backward_lr=s.backward_lr,
                   backward_schedule=s.backward_schedule, smoothing=s.smoothing,
                   smoothing_schedule=s.smoothing_schedule, smoothing_samples=s.smoothing_samples)
        accepted = {name for klass in getattr(GUIDERS.get(s.guider), "__mro__", ())     # subclasses pass **kwargs on
                    for name in inspect.signature(klass.__init__).parameters} if s.guider in GUIDERS else set()
        return make_guider(s.guider, objective, **base, **{k: v for k, v in own.items() if k in accepted})

    def _encode(self, prompt: str, objective, cfg: bool, device):
        """The conditioning of *prompt*; with ``composable``, one conditional batch per part of the prompt
        (``--sd-prompt 'a red circle|a blue square:0.5'``, else the objective's text prompts, with their weights;
        one part with `` AND `` in it is split there, A1111's syntax)."""
        from .families import compose
        from guidance.prompts import parse_prompts

        s, family = self.settings, self.family
        encode = lambda text: family.encode(text, s.negative_prompt, s.num_images, cfg, device, height=self.height,
                                            width=self.width)
        if not s.composable:
            return encode(prompt)
        schedule = getattr(objective, "schedule", None) if not s.prompt else None
        parts = ([(p.value, p.weight) for p in schedule.at(0) if p.kind == "text"] if schedule is not None
                 else [(p.value, p.weight) for p in parse_prompts(prompt)])
        if len(parts) == 1 and " AND " in parts[0][0]:      # A1111's composable syntax: "a cat AND a dog"
            parts = [(text.strip(), parts[0][1]) for text in parts[0][0].split(" AND ") if text.strip()]
        check_composable([w for _, w in parts], cfg)
        return compose([encode(text) for text, _ in parts], [w for _, w in parts])

    def _attention_steering(self, prompt: str, num_steps: int, tables) -> list:
        """The attention-steering methods the settings turn on (Attend-and-Excite, layout guidance)."""
        from .attention_steering import SteeringContext, build_steering, uses_attention_steering

        if self.family.flow and uses_attention_steering(self.settings):
            raise ValueError(f"Attend-and-Excite and layout guidance read a UNet's cross-attention; {self.family.label} "
                             "attends over text and image tokens jointly; drop --attend-excite/--layout for it")
        shape = self.family.latent_shape(1, self.height, self.width)
        return build_steering(self.settings, lambda: SteeringContext(
            unet=self.family.denoiser, tokenizer=self.pipe.tokenizer, prompt=prompt, latent_size=tuple(shape[-2:]),
            num_steps=num_steps, alpha_bars=tables.alpha_bar))

    def _denoiser(self, t, conditioning, scale: torch.Tensor | None = None, sigma: torch.Tensor | None = None):
        """The model at timestep *t* as the guiders see it (float32 outputs, on the VP latent ``z``).

        DDPM families: the model output itself. Rectified flow (*scale*, *sigma* given): the model runs on
        ``x_t = scale * z`` and its velocity ``v`` is handed on as the clean estimate ``x_t - sigma * v``."""
        from .guiders import Denoiser

        family, c = self.family, conditioning
        # composable prompts (Liu et al. 2022): eps_u + cfg * sum_i w_i (eps_i - eps_u) is CFG at scale cfg * W
        # (W = sum_i w_i) over the conditional output sum_i (w_i / W) eps_i
        parts = len(c.weights)
        cfg_scale = self.settings.cfg_scale * (sum(c.weights) if parts else 1.0)
        shares = [w / sum(c.weights) for w in c.weights]

        def mix(out):
            if parts < 2:
                return out
            return sum(w * o for w, o in zip(shares, out.chunk(parts)))

        def run(z, kwargs, batch: int = 1):
            x = z if scale is None else z * scale
            copies = 1 if kwargs is c.uncond else max(parts, 1) + (batch > 1)
            out = family.predict(torch.cat([x] * copies) if copies > 1 else x, t, kwargs)
            if batch > 1:
                out_uncond, out_cond = out[:len(x)], mix(out[len(x):])
                out = out_uncond + cfg_scale * (out_cond - out_uncond)
            elif kwargs is not c.uncond:
                out = mix(out)
            return out if sigma is None else x - sigma * out

        def guided(z):
            return run(z, c.both, 2 if c.cfg else 1)

        def conditional(z):
            return run(z, c.cond)

        def combine(z, out_cond):
            if not c.cfg:
                return out_cond
            out_uncond = run(z, c.uncond)
            return out_uncond + cfg_scale * (out_cond - out_uncond)

        def unconditional(z):
            return run(z, c.uncond)

        return Denoiser(guided=guided, conditional=conditional, combine=combine,
                        unconditional=unconditional if c.cfg else None)

    def _start_latents(self, timesteps, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Pure noise (``prepare_latents``) or, for img2img, the noised init image (the img2img pipeline's own)."""
        s = self.settings
        device = self.execution_device
        if not s.init_image:
            return self.family.start_latents(batch, self.height, self.width, generator, device)
        from guidance.images import load_image

        image = load_image(s.init_image, (self.width, self.height), what="init image")
        img2img = self._img2img()
        image = img2img.image_processor.preprocess(image).to(device, torch.float32)
        return img2img.prepare_latents(image, timesteps[:1].repeat(batch), batch, 1, torch.float32, device,
                                       generator).float()

    @torch.no_grad()
    def generate(self, objective, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        """Sample ``num_images`` images for one seed, steered by *objective* (``None``: plain SD)."""
        from .guiders import GuidedStep

        s, pipe, family = self.settings, self.pipe, self.family
        scheduler = pipe.scheduler
        device = self.execution_device
        started = time.perf_counter()
        # rectified flow: guiders get the clean estimate ("sample") in the VP frame, the scheduler the velocity
        prediction = "sample" if family.flow else scheduler.config.prediction_type
        noise_gen = seed_generator(seed, "init")            # the starting noise and the sampler's own noise
        objective_gen = seed_generator(seed, "objective")   # cutouts and augmentations

        prompt = self.conditioning_prompt(objective)
        cfg = family.uses_cfg(s.cfg_scale)
        conditioning = self._encode(prompt, objective, cfg, device)

        timesteps, begin = self._timesteps()
        latents = self._start_latents(timesteps, s.num_images, noise_gen)
        tables = self._tables(timesteps, begin, device)
        step_kwargs = pipe.prepare_extra_step_kwargs(noise_gen, s.ddim_eta) if not family.flow else {}
        guider = self.make_guider(objective)
        n = len(timesteps)
        setup_guider(guider, n, tables)
        steering = self._attention_steering(prompt, n, tables)

        step_losses: list[torch.Tensor] = []
        x0, done, interrupted, stopped_at = latents, 0, False, None
        # The scheduler gets each timestep as a Python number: its `prev_t >= 0` tests on a device tensor would
        # make the host wait for the device at every step.
        host_timesteps = timesteps.tolist()
        try:
            for i, t in enumerate(timesteps):
                flow = (tables.sample_scales[i], tables.sigmas[i]) if family.flow else (None, None)
                model = self._denoiser(t, conditioning, *flow)
                if steering:
                    c_in = scheduler.scale_model_input(torch.ones((), device=latents.device), t)
                    latents = steer_latents(steering, i, latents, c_in, model.conditional)
                repeats, state = guider.repeats(i), None
                for r in range(repeats):
                    if r:   # self-recurrence: undo the step's scheduler state, re-noise x_{t-1} back to x_t
                        scheduler.__dict__.update(state)
                        latents = renoise(latents, tables, i, objective_gen)
                    state = dict(scheduler.__dict__) if repeats > 1 else None
                    z = latents / flow[0] if family.flow else scheduler.scale_model_input(latents, t)
                    step = GuidedStep(index=i, timestep=t, z=z, alpha_bar=tables.alpha_bar(i),
                                      prediction_type=prediction, model=model, decode=self._guidance_decode,
                                      generator=objective_gen, next_alpha_bar=tables.next_alpha_bar(i),
                                      sigma_frame=tables.sigma_frame, repeat=r,
                                      next_sample_scale=tables.next_sample_scales[i] if family.flow else None)
                    # rectified flow: the corrected clean estimate goes to the scheduler as the velocity (x_t - x0) / t
                    velocity = (lambda out, z=z, flow=flow: (z * flow[0] - out) / flow[1]) if family.flow else None
                    latents, x0, loss = guided_scheduler_step(guider, step, scheduler, latents, host_timesteps[i],
                                                              to_scheduler=velocity, **step_kwargs)
                if loss is not None:
                    step_losses.append(loss.per_image.detach().mean())
                done = i + 1
                if done == n:
                    x0 = latents
                if callback is not None:
                    info = StepInfo(step=i, total=n, latents=latents, decode=lambda x=x0: self.decode(x),
                                    loss=None if loss is None else loss.per_image.detach().mean(),
                                    parts={} if loss is None else loss.parts)
                    if callback(info) is False:
                        stopped_at = i
                        break
        except KeyboardInterrupt:     # Ctrl-C: keep the latest clean estimate as the result
            interrupted = True
        images = self.decode(x0).float().cpu()
        pipe.maybe_free_model_hooks()
        info = {
            "backend": self.name, "seed": int(seed), "prompt": prompt, "negative_prompt": s.negative_prompt,
            "scheduler": type(scheduler).__name__, "prediction_type": prediction, "num_steps": n,
            "timesteps": [float(t) for t in timesteps], **guider.describe(),
            **{k: v for method in steering for k, v in method.describe().items()},
            "clip_guidance_scale": guider.scale if guider.enabled else 0.0, "cfg_scale": s.cfg_scale,
            "width": self.width, "height": self.height, "sd_model": s.sd_model, "family": family.name,
            **({"flux_guidance": family.guidance} if getattr(family, "distilled_guidance", False) else {}),
            "seconds": time.perf_counter() - started,
        }
        return GenerationResult(images=images, losses=[float(v) for v in step_losses], info=info,
                                interrupted=interrupted, steps_done=done, stopped_at=stopped_at)


def check_composable(weights: list[float], cfg: bool) -> None:
    """One line for composable prompts that cannot be combined."""
    if not cfg:
        raise ValueError("--composable combines classifier-free guidance directions, but this run has no CFG; "
                         "use --cfg-scale above 1 (or drop --composable)")
    if sum(weights) <= 0:
        raise ValueError(f"--composable prompt weights {weights} sum to {sum(weights):g}; the positive parts must "
                         "outweigh the negative ones (e.g. 'a red circle:1|a blue square:1|blurry:-0.5')")


def steer_latents(methods, index: int, latents: torch.Tensor, c_in: torch.Tensor, conditional) -> torch.Tensor:
    """The sampler's latents after the attention-steering *methods* moved their model input ``z = c_in *
    latents`` (``c_in``: the scheduler's ``scale_model_input`` factor, 1 on VP schedulers)."""
    start = latents * c_in
    z = start
    for method in methods:
        z = method.correct(index, z, conditional)
    return latents if z is start else z / c_in


def decoder_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype of a VAE decode in the hot loop: the run's half dtype, except fp16 for a VAE whose
    config asks for float32 (``force_upcast``: the SD 1.x/2.x VAE overflows fp16); bf16 has fp32's range."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def _to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


# -- loading -----------------------------------------------------------------------------------------
def _check_settings(s: Settings, device: torch.device) -> None:
    if s.guider not in GUIDERS:
        raise ValueError(f"unknown guider {s.guider!r}; choose from {', '.join(sorted(GUIDERS))}")
    if s.scheduler not in SCHEDULER_CHOICES:
        raise ValueError(f"unknown scheduler {s.scheduler!r}; choose from {', '.join(SCHEDULERS)}, default or auto")
    if s.guidance_gradient not in GRADIENT_MODES:
        raise ValueError(f"unknown guidance_gradient {s.guidance_gradient!r}; choose {', '.join(GRADIENT_MODES)}")
    if s.guider_defaults not in PROFILES:
        raise ValueError(f"unknown guider_defaults {s.guider_defaults!r}; choose {', '.join(PROFILES)}")
    if s.guider in ("dps", "freedom") and s.step_rule == "cfg" and s.cfg_scale <= 1:
        raise ValueError(f"--step-rule cfg (FreeDoM's own step size) needs classifier-free guidance, but --cfg-scale "
                         f"is {s.cfg_scale:g}; use --cfg-scale above 1 or another --step-rule")
    if s.steps < 1:
        raise ValueError(f"steps is {s.steps}; use at least 1")
    if s.num_images < 1:
        raise ValueError(f"num_images is {s.num_images}; use at least 1")
    if not 0.0 <= s.guidance_start < s.guidance_end <= 1.0:
        raise ValueError(f"guidance window [{s.guidance_start}, {s.guidance_end}) is empty or outside [0, 1]; "
                         "use 0 <= --guidance-start < --guidance-end <= 1")
    if s.guidance_every < 1:
        raise ValueError(f"guidance_every is {s.guidance_every}; use 1 (every step) or more")
    if s.recurrence < 1:
        raise ValueError(f"recurrence is {s.recurrence}; use 1 (no self-recurrence) or more")
    if s.recurrence > 1 and s.scheduler not in ("default", "auto"):
        check_recurrence(s.recurrence, s.scheduler)
    if s.init_image:
        from guidance.images import check_image_file

        check_image_file(s.init_image, what="init image")
        if not 0.0 < s.strength <= 1.0:
            raise ValueError(f"strength is {s.strength}; use a value in (0, 1] (1 re-noises the init image fully)")
    from .attention_steering import STEERING

    for method in STEERING.values():
        if method.enabled(s):
            method.check(s)
            if s.composable:
                raise ValueError(f"--composable does not combine with {method.name} (its subject tokens are read "
                                 "from one prompt); drop one of them")
    if s.cpu_offload and device.type != "cuda":
        raise ValueError(f"--cpu-offload needs a CUDA device, but the device is {device.type}; drop --cpu-offload")


def check_recurrence(recurrence: int, scheduler) -> None:
    """One line, before sampling, for self-recurrence with a scheduler (name or instance) whose step keeps history."""
    if recurrence <= 1:
        return
    cls = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
    name = cls if isinstance(scheduler, str) else next((k for k, v in SCHEDULERS.items() if v == cls), cls)
    if name not in RECURRENT_SCHEDULERS and cls not in (*RECURRENT_SCHEDULERS.values(), FLOW_SCHEDULER):
        raise ValueError(f"--recurrence {recurrence} cannot repeat a step of scheduler {name} (its step keeps a "
                         f"history of model outputs); use --scheduler {', '.join(RECURRENT_SCHEDULERS)} or "
                         "--recurrence 1")


def _build_scheduler(name: str, config):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    try:
        return cls.from_config(config)
    except ImportError as err:   # LMS needs scipy
        raise ImportError(f"--scheduler {name} needs an extra package: {str(err).strip().splitlines()[-1]}") from None


def _looks_like_path(name: str) -> bool:
    return looks_like_path(name, SINGLE_FILE_SUFFIXES)


def _load_error(kind: str, name: str, err: Exception) -> OSError:
    return load_error(kind, name, err)


def check_model_path(spec: str) -> Path:
    """One-line errors, before anything loads, for a local --sd model that is missing, not a pipeline, or of a
    family clipsteer does not support."""
    path = Path(spec).expanduser()
    if spec.endswith(SINGLE_FILE_SUFFIXES):
        if not path.is_file():
            raise FileNotFoundError(f"Stable Diffusion checkpoint file {spec!r} does not exist; give an existing "
                                    ".safetensors/.ckpt file, a diffusers folder or a Hub id")
    elif path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{spec!r} is not a diffusers pipeline folder (no model_index.json); "
                                    "point --sd at the folder that `save_pretrained` or `hf download` wrote")
        family_class(pipeline_class_of(spec, path, False), spec)     # an unsupported family: one line, now
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"Stable Diffusion model folder {spec!r} does not exist; give a Hub id such as "
                                "'stable-diffusion-v1-5/stable-diffusion-v1-5' or an existing local folder")
    return path


def load_pipeline(spec: str, *, dtype: torch.dtype = torch.float32, config: str | None = None,
                  vae: str | None = None):
    """The diffusers pipeline of a Hub id, a diffusers folder or a single checkpoint file, its class (SD 1.x/2.x,
    SDXL, SD3, FLUX) found from the model (:func:`~generators.families.pipeline_class_of`); safety checker never
    loaded; ``.ckpt`` files are read with ``weights_only=True`` (a pickle holding more is refused in one line);
    *vae*: a replacement ``AutoencoderKL``."""
    with readable_weights("Stable Diffusion model", spec):
        return _load_pipeline(spec, dtype=dtype, config=config, vae=vae)


def _load_pipeline(spec: str, *, dtype: torch.dtype, config: str | None, vae: str | None):
    import diffusers

    path = check_model_path(spec)
    single = spec.endswith(SINGLE_FILE_SUFFIXES)
    try:
        name = pipeline_class_of(spec, path, single)
    except (OSError, ValueError) as err:
        raise _load_error("Stable Diffusion model", spec, err) from None
    family = family_class(name, spec)
    cls = getattr(diffusers, family.pipeline_class)
    common = dict(dtype=dtype, **(family.single_file_kwargs if single else family.load_kwargs))
    if vae:
        common["vae"] = load_vae(vae)
    if single:
        extra = {"config": config} if config else {}
        try:
            return cls.from_single_file(str(path), **common, **extra)
        except (OSError, ValueError) as err:
            raise OSError(f"could not load single-file checkpoint {spec!r}: {first_line(err)}; offline, also "
                          "pass --sd-config "
                          "with a local diffusers folder of the same model type (it supplies the configs)") from None
    try:
        return cls.from_pretrained(str(path) if path.exists() else spec, **common)
    except (OSError, ValueError) as err:
        raise _load_error("Stable Diffusion model", spec, err) from None


def load_vae(spec: str):
    """A replacement ``AutoencoderKL`` (e.g. ``madebyollin/sdxl-vae-fp16-fix``) from a Hub id or folder."""
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    if not path.exists() and _looks_like_path(spec):
        raise FileNotFoundError(f"VAE folder {spec!r} does not exist; give a Hub id such as "
                                "'madebyollin/sdxl-vae-fp16-fix' or an existing local folder")
    try:
        return AutoencoderKL.from_pretrained(str(path) if path.exists() else spec, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise _load_error("VAE", spec, err) from None


def cached_pipeline(spec: str, *, dtype: torch.dtype = torch.float32, config: str | None = None,
                    vae: str | None = None):
    """:func:`load_pipeline`, kept in the model cache across runs for the same (model, dtype, config)."""
    from guidance.cache import cached

    path = Path(spec).expanduser()
    marker = path / "model_index.json" if path.is_dir() else path
    stamp = (marker.stat().st_mtime_ns, marker.stat().st_size) if marker.exists() else None
    key = (str(path.resolve()) if path.exists() else spec, stamp, str(dtype), config, vae)

    def load():
        pipe = load_pipeline(spec, dtype=dtype, config=config, vae=vae)
        pipe.__dict__["_clipsteer_default_scheduler"] = pipe.scheduler
        return pipe

    return cached("pipeline", key, load)


def load_tiny_vae(spec: str, pipe):
    """An ``AutoencoderTiny`` (e.g. ``madebyollin/taesd``) checked against the pipeline's latent space."""
    from diffusers import AutoencoderTiny

    path = Path(spec).expanduser()
    if not path.exists() and _looks_like_path(spec):
        raise FileNotFoundError(f"tiny VAE folder {spec!r} does not exist; give a Hub id such as "
                                "'madebyollin/taesd' or an existing local folder")
    try:
        vae = AutoencoderTiny.from_pretrained(str(path) if path.exists() else spec, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise _load_error("tiny VAE", spec, err) from None
    check_tiny_vae(vae, pipe)
    return vae


def check_tiny_vae(vae, pipe) -> None:
    cfg = vae.config
    factor = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1)
    if cfg.latent_channels != pipe.vae.config.latent_channels or factor != pipe.vae_scale_factor:
        raise ValueError(f"tiny VAE has {cfg.latent_channels} latent channels and {factor}x upsampling, the "
                         f"pipeline {pipe.vae.config.latent_channels} and {pipe.vae_scale_factor}x; use the tiny "
                         "VAE made for this model family (taesd for SD 1.x/2.x, taesdxl, taesd3, taef1)")
