"""Diffusion models through diffusers (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1), with an objective steering every
guided denoising step.

Each model family is an adapter of :mod:`generators.diffusion.families` (conditioning, starting latents,
timesteps, the denoiser call and the VAE's input, all with the diffusers pipeline's own methods); the
loop below is the same for every family. Rectified-flow families (SD3, FLUX) are handed to the guiders
in the variance-preserving frame with their clean estimate as a ``"sample"`` prediction, and the
corrected clean estimate goes back to ``FlowMatchEulerDiscreteScheduler`` as a velocity.

At a guided step the clean latent is predicted from the current latent and the (CFG) model
output at the scheduler's own noise level, decoded by the VAE (or a tiny ``AutoencoderTiny``)
with gradients, scored by the objective (``guidance.Objective``), and the gradient is turned into a correction of the
model output that the scheduler's ``step`` consumes (see :mod:`generators.diffusion.tables`). So the
same code serves DDIM, PNDM, DPM-Solver++, Euler, Euler ancestral, LMS and UniPC, for eps-,
v- and x0-prediction checkpoints, and with ``clip_guidance_scale=0`` the loop is exactly
``StableDiffusionPipeline.__call__``.

The correction itself belongs to a guider (``--guider``, :mod:`generators.diffusion.guiders`: ``clip``, ``dps``,
``mpgd``, ``freedom``, ``ugd``, ``tfg``). The loop per step: ``guider.model_output(step)`` ->
``scheduler.step`` -> ``guider.sample_correction``; with self-recurrence (``--recurrence K``) it then
restores the scheduler's step state, re-noises the sample back to the step's noise level
(:func:`~generators.diffusion.tables.renoise`, the run's noise tables, the objective's random stream) and
runs the step again, K times in all (DDIM, Euler, Euler ancestral; schedulers that keep a history of
model outputs are refused).

Its cost per guided step and its precision rules are in docs/methods.md ("The sd backend: speed and
precision").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..base import GenerationResult, Generator, StepCallback, StepInfo, option, seed_generator
from .guiders.defaults import PROFILES, fill_guider_defaults, profile_summary
from .guiders import (GUIDERS, CLIPGuider, GuiderSettings, check_guider, guided_scheduler_step, guider_from_settings,
                      guider_names, setup_guider, with_guider_options)
from . import attend_excite, layout_guidance  # noqa: F401  (they register their attention steering)
from .attention_steering import SteeringOptions, steer_latents
from .families import check_composable, family_of
from .pipeline import (FLOW_SCHEDULER, SCHEDULER_CHOICES, SCHEDULERS, cached_pipeline,
                       check_model_path, check_scheduler_name, choose_scheduler, image_size,
                       load_pipeline, load_tiny_vae, prepare_models, sd_config_option, vae_decode)
from .tables import check_scheduler, flow_tables, noise_tables, renoise

GRADIENT_MODES = CLIPGuider.MODES
# Schedulers whose step may be repeated after re-noising (self-recurrence): their step depends only on
# the timestep (DDIM) or on a step index the loop restores (Euler, Euler ancestral). PNDM, LMS,
# DPM-Solver++ and UniPC keep a history of model outputs that a repeated step would corrupt.
RECURRENT_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "euler_a": "EulerAncestralDiscreteScheduler"}


@dataclass
class Settings(SteeringOptions, GuiderSettings):
    """Options of the ``sd`` backend (CLI flags and config keys come from these fields), with the built-in guiders'
    own options (:class:`~generators.diffusion.guiders.GuiderSettings`; a guider registered later adds its own
    through :meth:`StableDiffusionGenerator.settings_class`)."""

    sd_model: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5", "diffusion model (SD 1.x/2.x, SDXL, SD3/3.5 "
                           "or FLUX.1, found from the model): Hub id, local diffusers folder, or one "
                           ".safetensors/.ckpt file", flag="--sd", path="model")
    sd_config: str | None = sd_config_option()
    steps: int = option(30, "denoising steps", flag="--steps", minimum=1)
    scheduler: str = option("auto", "sampler ('default': the checkpoint's own; 'auto': dpm++ for SD 1.x/2.x and "
                                    "SDXL, the model's own flow-matching Euler for SD3/FLUX)", flag="--scheduler",
                            choices=SCHEDULER_CHOICES)
    guider: str = option("clip", "how the objective corrects each guided step", flag="--guider",
                         choices=guider_names)
    guider_defaults: str = option("clipsteer", "where the guider's unset settings come from: clipsteer (the "
                                               "project's own choices), toy (--preset toy's) or paper (each guider's "
                                               "reference code, docs/guiders.md: " + profile_summary("paper") + ")",
                                  choices=PROFILES)
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
    layout_sketch: str = option("", "start from a sketch of the layout (SDEdit): the background and a blob per "
                                    "subject box painted in the prompt's colour words, then img2img at --strength; "
                                    "boxes as --layout, or auto (from the prompt's relation)")
    strength: float = option(0.8, "img2img: how much of the schedule re-noises the init image or the layout "
                                  "sketch (0-1]", above=0, maximum=1, requires=("init_image", "layout_sketch"))
    num_images: int = option(1, "images generated per prompt (one batch)", flag="--num-images", minimum=1)
    ddim_eta: float | None = option(None, "DDIM's eta (--scheduler ddim; 0: deterministic, 1: DDPM-like; default: "
                                          "the guider's, 1 for the TFG-family papers)", minimum=0)
    composable: bool = option(False, "composable prompts (Liu et al. 2022): condition on each '|' part of the "
                                     "prompt separately and add their CFG directions, weighted by the parts' "
                                     "weights (negative: NOT)")
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
        """Settings left ``None`` take the guider's default under ``guider_defaults`` (generators.diffusion.guiders.defaults)."""
        if self.guider in GUIDERS and self.guider_defaults in PROFILES:
            fill_guider_defaults(self, guider=self.guider, profile=self.guider_defaults)


def toy_preset() -> dict:
    """This backend's part of ``--preset toy``: the toy Stable Diffusion pipeline."""
    from ..runs.presets import toyworld_weights

    # every guider's strength comes from the "toy" guider defaults (generators.diffusion.guiders.defaults), chosen
    # on the toy tuning prompts (docs/benchmarks.md, "How the toy settings were chosen")
    return {"sd_model": str(toyworld_weights("sd", check=True)), "guider_defaults": "toy"}


class StableDiffusionGenerator(Generator):
    """Stable Diffusion sampling with CLIP guidance injected into the denoising loop (classifier
    guidance of Dhariwal & Nichol 2021 with a CLIP loss, as in the diffusers community CLIP-guided
    pipeline and Disco Diffusion), on top of classifier-free guidance.

    ``pipeline``: an already built ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline`` or ``FluxPipeline`` to use instead of loading ``sd_model`` (its scheduler
    is replaced per ``settings.scheduler`` and its weights are frozen).

    ``generate(objective, seed=, callback=)``: ``objective=None`` or ``clip_guidance_scale=0`` is
    plain diffusers sampling. The UNet is conditioned on ``settings.prompt``, or, when that is empty,
    on the objective's positive text prompts at step 0 joined with ", ". The step callback's
    ``StepInfo.decode()`` renders the current clean-image estimate (the final latents after the last
    step); stopping early (callback returns ``False``, or Ctrl-C) returns that estimate.
    ``result.info`` records ``guided_steps`` (step indices), ``num_steps``, ``steps_done``,
    ``timesteps`` and the settings that shaped the run; ``result.losses`` the mean per-image CLIP
    loss of each guided step. :meth:`generate` reads as numbered steps, as diffusers' pipelines do.
    """

    name = "sd"
    Settings = Settings
    presets = {"toy": toy_preset}

    @classmethod
    def settings_class(cls) -> type:
        return with_guider_options(cls.Settings)

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
        if (s.init_image or s.layout_sketch) and self.family.name != "sd":
            flag = "--init-image" if s.init_image else "--layout-sketch"
            raise ValueError(f"{flag} (img2img) supports SD 1.x/2.x models; {self.family.label} samples from "
                             f"noise only: drop {flag}")
        pipe.scheduler = choose_scheduler(pipe, self.family, s.scheduler, auto="dpm++")
        if not self.family.flow:
            check_scheduler(pipe.scheduler)
        check_recurrence(s.recurrence, pipe.scheduler)
        self.vae_scale = int(pipe.vae_scale_factor)
        self.width, self.height = image_size(self.family, s.width, s.height)
        self.tiny_vae = load_tiny_vae(s.tiny_vae, pipe) if s.tiny_vae else None
        self._place_models()
        # Fail now, not mid-run, if the schedule has no readable noise level.
        timesteps, begin = self._timesteps()
        self._tables(timesteps, begin, "cpu")

    # -- set-up --------------------------------------------------------------------------------
    def _tables(self, timesteps, begin: int, device):
        """The run's noise tables (:func:`~generators.diffusion.tables.noise_tables`; rectified flow: ``flow_tables``)."""
        if self.family.flow:
            return flow_tables(self.pipe.scheduler, timesteps, device)
        return noise_tables(self.pipe.scheduler, timesteps, device, begin_index=begin)

    def _place_models(self) -> None:
        s, pipe = self.settings, self.pipe
        prepare_models(pipe, self.family, self.dtype)
        # Set both ways: a cached pipeline may carry the previous run's choices.
        pipe.enable_attention_slicing() if s.attention_slicing else pipe.disable_attention_slicing()
        for name, on in (("slicing", s.vae_slicing), ("tiling", s.vae_tiling)):
            switch = getattr(pipe.vae, f"{'enable' if on else 'disable'}_{name}", None)
            if switch is not None:
                switch()
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

            self._img2img_pipe = StableDiffusionImg2ImgPipeline(**self.pipe.components,
                                                                requires_safety_checker=False)
            self._img2img_pipe.set_progress_bar_config(disable=True)
        self._img2img_pipe.scheduler = self.pipe.scheduler
        return self._img2img_pipe

    def _timesteps(self, img2img: bool | None = None) -> tuple[torch.Tensor, int]:
        """``set_timesteps`` then, for img2img (default: with ``--init-image``), the slice the img2img pipeline's
        ``get_timesteps`` keeps; returns (timesteps, index of the first one in the scheduler's tables)."""
        s, scheduler = self.settings, self.pipe.scheduler
        if not (bool(s.init_image) if img2img is None else img2img):
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
        half precision (see :func:`~generators.diffusion.pipeline.decoder_dtype`)."""
        vae = self.tiny_vae if self.tiny_vae is not None else self.pipe.vae
        return vae_decode(vae, self.family, latents, dtype=self.dtype, height=self.height, width=self.width)

    def compile_targets(self) -> list[torch.nn.Module]:
        return [vae.decoder for vae in (self.pipe.vae, self.tiny_vae) if vae is not None]

    # -- sampling ------------------------------------------------------------------------------
    def make_guider(self, objective):
        """The guider of ``settings.guider`` with its options read from this backend's settings."""
        return guider_from_settings(self.settings.guider, objective, self.settings)

    def _encode(self, prompt: str, objective, cfg: bool, device):
        """The conditioning of *prompt*; with ``composable``, one conditional batch per part of the prompt
        (``--sd-prompt 'a red circle|a blue square:0.5'``, else the objective's text prompts, with their weights;
        one part with `` AND `` in it is split there, A1111's syntax)."""
        from .families import compose, composable_parts

        s, family = self.settings, self.family
        encode = lambda text: family.encode(text, s.negative_prompt, s.num_images, cfg, device, height=self.height,
                                            width=self.width)
        if not s.composable:
            return encode(prompt)
        parts = composable_parts(prompt, getattr(objective, "schedule", None) if not s.prompt else None)
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

    def init_picture(self, prompt: str):
        """The picture img2img starts from: ``--init-image``, or the ``--layout-sketch`` of *prompt* (``None``:
        sample from noise; a sketch's layout with no box gives none)."""
        s = self.settings
        if s.init_image:
            from guidance.images import load_image

            return load_image(s.init_image, (self.width, self.height), what="init image")
        if s.layout_sketch:
            from .layout_sketch import layout_sketch

            return layout_sketch(s.layout_sketch, prompt, self.width, self.height)
        return None

    def _start_latents(self, timesteps, batch: int, generator: torch.Generator, image=None) -> torch.Tensor:
        """Pure noise (``prepare_latents``) or, for img2img, the noised *image* (the img2img pipeline's own)."""
        device = self.execution_device
        if image is None:
            return self.family.start_latents(batch, self.height, self.width, generator, device)
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
        # 1. Random streams and the prediction the guiders see;
        # rectified flow: guiders get the clean estimate ("sample") in the VP frame, the scheduler the velocity
        prediction = "sample" if family.flow else scheduler.config.prediction_type
        noise_gen = seed_generator(seed, "init")            # the starting noise and the sampler's own noise
        objective_gen = seed_generator(seed, "objective")   # cutouts and augmentations

        # 2. Encode the conditioning prompt (and the negative one for classifier-free guidance)
        prompt = self.conditioning_prompt(objective)
        cfg = family.uses_cfg(s.cfg_scale)
        conditioning = self._encode(prompt, objective, cfg, device)

        # 3. Timesteps, starting latents and the run's noise tables
        picture = self.init_picture(prompt)
        timesteps, begin = self._timesteps(img2img=picture is not None)
        latents = self._start_latents(timesteps, s.num_images, noise_gen, picture)
        tables = self._tables(timesteps, begin, device)
        # 4. The scheduler's extra step arguments (eta) and the guider, set up for this schedule
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
        # 5. Denoising loop: guided model output -> scheduler step -> the guider's sample correction
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
        # 6. Decode the final latents (or the latest clean estimate when stopped early)
        images = self.decode(x0).float().cpu()
        pipe.maybe_free_model_hooks()
        # 7. What shaped the run
        info = {
            "backend": self.name, "seed": int(seed), "prompt": prompt, "negative_prompt": s.negative_prompt,
            "scheduler": type(scheduler).__name__, "prediction_type": prediction, "num_steps": n,
            "timesteps": [float(t) for t in timesteps], **guider.describe(),
            **{k: v for method in steering for k, v in method.describe().items()},
            **({"layout_sketch": s.layout_sketch, "strength": s.strength}
               if s.layout_sketch and picture is not None else {}),
            "clip_guidance_scale": guider.scale if guider.enabled else 0.0, "cfg_scale": s.cfg_scale,
            "width": self.width, "height": self.height, "sd_model": s.sd_model, "family": family.name,
            **({"flux_guidance": family.guidance} if getattr(family, "distilled_guidance", False) else {}),
            "seconds": time.perf_counter() - started,
        }
        return GenerationResult(images=images, losses=[float(v) for v in step_losses], info=info,
                                interrupted=interrupted, steps_done=done, stopped_at=stopped_at)


# -- loading -----------------------------------------------------------------------------------------
def _check_settings(s: Settings, device: torch.device) -> None:
    guider = check_guider(s.guider)
    check_scheduler_name(s.scheduler)
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
    guider.from_settings(None, s)     # the guider checks its own options (window, strength, its rule's)
    if s.recurrence > 1 and s.scheduler not in ("default", "auto"):
        check_recurrence(s.recurrence, s.scheduler)
    if s.layout_sketch:
        from .layout_sketch import check_layout_sketch

        check_layout_sketch(s.layout_sketch, init_image=s.init_image)
    if s.init_image:
        from guidance.images import check_image_file

        check_image_file(s.init_image, what="init image")
    if s.init_image or s.layout_sketch:
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
