"""Stable Diffusion through diffusers, with a CLIP loss steering every guided denoising step.

At a guided step the clean latent is predicted from the current latent and the (CFG) model
output at the scheduler's own noise level, decoded by the VAE (or a tiny ``AutoencoderTiny``)
with gradients, scored by the ``CLIPLoss``, and the gradient is turned into a correction of the
model output that the scheduler's ``step`` consumes (see :mod:`generators.sd_guidance`). So the
same code serves DDIM, PNDM, DPM-Solver++, Euler, Euler ancestral, LMS and UniPC, for eps-,
v- and x0-prediction checkpoints, and with ``clip_guidance_scale=0`` the loop is exactly
``StableDiffusionPipeline.__call__``.

Speed: every weight is frozen, the CFG UNet output is reused, and by default
(``guidance_gradient="x0"``) the gradient stops at the clean estimate, so a guided step costs
one UNet forward plus a VAE-decoder forward/backward and the CLIP passes. ``"full"``
backpropagates through the UNet as the diffusers community CLIP-guided pipeline does, but runs
the text-conditional UNet pass once (with gradients) and reuses it for CFG, where that pipeline
runs it twice.

Precision: the UNet and text encoder run in the requested dtype; the latents, the scheduler
arithmetic, the VAE (decoding and guidance) and the guidance gradient stay float32. When a CLIP
encoder is fp16 the loss is scaled by 2**10 for its backward and unscaled afterwards
(non-finite entries are zeroed), so small gradients do not underflow.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import GenerationResult, Generator, StepCallback, StepInfo
from .sd_guidance import (check_scheduler, clean_estimate, clip_gradient, guided_steps, noise_frame,
                          output_correction, straight_through_clamp)

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
GRADIENT_MODES = ("x0", "full")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HALF_LOSS_SCALE = 2.0 ** 10


def _opt(default, help: str, flag: str | None = None, choices=None, **kwargs):
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    if choices:
        meta["choices"] = list(choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


@dataclass
class Settings:
    """Options of the ``sd`` backend (CLI flags and config keys come from these fields)."""

    sd_model: str = _opt("stable-diffusion-v1-5/stable-diffusion-v1-5",
                         "Stable Diffusion checkpoint: Hub id, local diffusers folder, or one .safetensors/.ckpt file",
                         "--sd")
    sd_config: str | None = _opt(None, "for a single-file --sd checkpoint: a local diffusers folder or Hub id "
                                       "holding its configs (needed offline)", "--sd-config")
    steps: int = _opt(30, "denoising steps", "--steps")
    scheduler: str = _opt("dpm++", "sampler ('default': the checkpoint's own)", "--scheduler",
                          choices=[*SCHEDULERS, "default"])
    clip_guidance_scale: float = _opt(100.0, "strength of the CLIP loss gradient in each guided step (0: off)",
                                      "--clip-guidance-scale")
    cfg_scale: float = _opt(7.5, "classifier-free guidance scale (1 or less: no CFG)", "--cfg-scale")
    prompt: str = _opt("", "conditioning text for the UNet (empty: the CLIP text prompts with positive weight, "
                           "joined with ', ')", "--sd-prompt")
    negative_prompt: str = _opt("", "negative conditioning text for classifier-free guidance", "--negative-prompt")
    width: int = _opt(0, "image width in pixels, a multiple of 8 (0: the model's native size)")
    height: int = _opt(0, "image height in pixels, a multiple of 8 (0: the model's native size)")
    init_image: str | None = _opt(None, "start from this image (img2img) instead of pure noise")
    strength: float = _opt(0.8, "img2img: how much of the schedule re-noises the init image (0-1]")
    num_images: int = _opt(1, "images generated per prompt (one batch)", "--num-images")
    guidance_start: float = _opt(0.0, "first fraction of the schedule that gets CLIP guidance (0-1)")
    guidance_end: float = _opt(1.0, "fraction of the schedule where CLIP guidance stops (0-1)")
    guidance_every: int = _opt(1, "guide every k-th step inside the window")
    guidance_gradient: str = _opt("x0", "x0: gradient through the clean-latent estimate with the UNet output held "
                                        "fixed (fast); full: backprop through the UNet too (community pipeline)",
                                  choices=GRADIENT_MODES)
    tiny_vae: str | None = _opt(None, "AutoencoderTiny (Hub id or folder, e.g. madebyollin/taesd) that decodes the "
                                      "guidance image (much cheaper than the full VAE)")
    channels_last: bool = _opt(True, "run the VAE decoders in channels-last memory format (the SD 1.5 VAE "
                                     "decodes ~20% faster on CPU; --no-channels-last: contiguous)")
    vae_slicing: bool = _opt(False, "decode the batch one image at a time (less memory)")
    vae_tiling: bool = _opt(False, "decode in tiles (large images, less memory)")
    attention_slicing: bool = _opt(False, "sliced attention (less memory; default is PyTorch SDPA)")
    cpu_offload: bool = _opt(False, "keep models in CPU memory and move each to the GPU when it runs "
                                    "(accelerate model offload; CUDA only)")


class StableDiffusionGenerator(Generator):
    """Stable Diffusion sampling with CLIP guidance injected into the denoising loop (classifier
    guidance of Dhariwal & Nichol 2021 with a CLIP loss, as in the diffusers community CLIP-guided
    pipeline and Disco Diffusion), on top of classifier-free guidance.

    ``pipeline``: an already built ``StableDiffusionPipeline`` to use instead of loading ``sd_model``
    (its scheduler is replaced per ``settings.scheduler`` and its weights are frozen).

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

    def __init__(self, settings: Settings | None = None, *, device=None, precision=None, pipeline=None):
        super().__init__(settings, device=device, precision=precision)
        s = self.settings
        _check_settings(s, self.device)
        if pipeline is not None:
            self.pipe = pipeline
        elif s.cpu_offload:  # offload hooks stay on a pipeline: never share one
            self.pipe = load_pipeline(s.sd_model, dtype=self.dtype, config=s.sd_config)
        else:
            self.pipe = cached_pipeline(s.sd_model, dtype=self.dtype, config=s.sd_config)
        pipe = self.pipe
        if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
            raise ValueError(f"{s.sd_model!r} has a {pipe.unet.config.in_channels}-channel UNet (an inpainting or "
                             "depth model?); use a text-to-image Stable Diffusion checkpoint")
        pipe.set_progress_bar_config(disable=True)
        # A cached pipeline remembers the scheduler it was loaded with; each run starts from that one.
        default = pipe.__dict__.get("_clipsteer_default_scheduler", pipe.scheduler)
        pipe.scheduler = default if s.scheduler == "default" else _build_scheduler(s.scheduler, default.config)
        check_scheduler(pipe.scheduler)
        self.vae_scale = int(pipe.vae_scale_factor)
        self.width, self.height = self._size()
        self.tiny_vae = load_tiny_vae(s.tiny_vae, pipe) if s.tiny_vae else None
        self._place_models()
        self._step_kwargs = set(inspect.signature(pipe.scheduler.step).parameters)
        # Fail now, not mid-run, if the schedule has no readable noise level.
        timesteps, _ = self._timesteps()
        noise_frame(pipe.scheduler, timesteps)

    # -- set-up --------------------------------------------------------------------------------
    def _size(self) -> tuple[int, int]:
        s, pipe = self.settings, self.pipe
        native = pipe.unet.config.sample_size
        native = native if isinstance(native, int) else native[0]
        multiple = max(8, self.vae_scale)
        sizes = []
        for name, value in (("width", s.width), ("height", s.height)):
            value = value or native * self.vae_scale
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
        for name in ("unet", "text_encoder"):
            _to_dtype(getattr(pipe, name), self.dtype)
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

    def _timesteps(self) -> tuple[torch.Tensor, int]:
        """``set_timesteps`` then, for img2img, the slice diffusers' img2img pipeline keeps."""
        s, scheduler = self.settings, self.pipe.scheduler
        scheduler.set_timesteps(s.steps, device=self.execution_device)
        timesteps = scheduler.timesteps
        if not s.init_image:
            return timesteps, 0
        keep = min(int(s.steps * s.strength), s.steps)
        if keep < 1:
            raise ValueError(f"--strength {s.strength} with --steps {s.steps} leaves no denoising step; "
                             f"use a strength of at least {1 / s.steps:.3g} or more steps")
        start = (s.steps - keep) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return timesteps[start:], start

    def conditioning_prompt(self, clip_loss) -> str:
        """``settings.prompt``, or else the CLIPLoss's positive text prompts at step 0 joined with ', '."""
        if self.settings.prompt or clip_loss is None:
            return self.settings.prompt
        texts = [p.value for p in clip_loss.schedule.at(0) if p.kind == "text" and p.weight > 0]
        return ", ".join(texts)

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``[B,3,H,W]`` in ``[0,1]`` with the full VAE (float32, no gradient)."""
        vae = self.pipe.vae
        with torch.no_grad():
            image = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def _guidance_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable decode of the clean estimate for the CLIP loss (tiny VAE if set)."""
        vae = self.tiny_vae if self.tiny_vae is not None else self.pipe.vae
        image = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        return straight_through_clamp(image.float() / 2 + 0.5)

    def _init_latents(self, image_path: str, batch: int, generator: torch.Generator) -> torch.Tensor:
        from guidance import load_image

        image = load_image(image_path)
        if image.shape[-2:] != (self.height, self.width):
            image = F.interpolate(image, size=(self.height, self.width), mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 1)
        vae = self.pipe.vae
        with torch.no_grad():
            dist = vae.encode(image.to(self.execution_device) * 2 - 1).latent_dist
            latents = dist.sample(generator) * vae.config.scaling_factor
        return latents.float().repeat(batch, 1, 1, 1)

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, clip_loss, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        """Sample ``num_images`` images for one seed, steered by ``clip_loss`` (``None``: plain SD)."""
        from diffusers.utils.torch_utils import randn_tensor

        s, pipe = self.settings, self.pipe
        scheduler, unet = pipe.scheduler, pipe.unet
        device = self.execution_device
        started = time.perf_counter()
        guide = clip_loss is not None and s.clip_guidance_scale != 0
        prediction = scheduler.config.prediction_type
        noise_gen = torch.Generator().manual_seed(int(seed))             # a seed means the same image anywhere
        clip_gen = torch.Generator().manual_seed(int(seed) + 0x5EED)     # cutouts: a stream of their own

        prompt = self.conditioning_prompt(clip_loss)
        cfg = s.cfg_scale > 1 and unet.config.time_cond_proj_dim is None
        cond, uncond = pipe.encode_prompt(prompt, device, s.num_images, cfg, s.negative_prompt or None)
        embeds = torch.cat([uncond, cond]) if cfg else cond

        timesteps, _ = self._timesteps()
        batch = s.num_images
        shape = (batch, unet.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale)
        if s.init_image:
            init = self._init_latents(s.init_image, batch, noise_gen)
            noise = randn_tensor(shape, generator=noise_gen, device=device, dtype=torch.float32)
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))
        else:
            latents = randn_tensor(shape, generator=noise_gen, device=device, dtype=torch.float32)
            latents = latents * scheduler.init_noise_sigma
        frame = noise_frame(scheduler, timesteps, device)
        step_kwargs = {k: v for k, v in (("generator", noise_gen), ("eta", 0.0)) if k in self._step_kwargs}

        n = len(timesteps)
        to_guide = set(guided_steps(n, start=s.guidance_start, end=s.guidance_end, every=s.guidance_every)) \
            if guide else set()
        loss_scale = HALF_LOSS_SCALE if guide and any(
            p.dtype == torch.float16 for p in clip_loss.parameters()) else 1.0

        def denoise(z, t, out_cond=None):
            """The classifier-free-guided model output at VP input ``z`` (float32).

            Given the text-conditional output ``out_cond`` (computed with gradients by a "full" guided
            step), only the unconditional half is run, so no UNet forward is done twice."""
            if out_cond is not None:
                if not cfg:
                    return out_cond
                out_uncond = unet(z, t, encoder_hidden_states=uncond, return_dict=False)[0].float()
                return out_uncond + s.cfg_scale * (out_cond - out_uncond)
            out = unet(torch.cat([z, z]) if cfg else z, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if cfg:
                out_uncond, out_cond = out.float().chunk(2)
                return out_uncond + s.cfg_scale * (out_cond - out_uncond)
            return out.float()

        def conditional(z, t, keep: dict):
            """The text-conditional output with gradients ("full" mode, as the community pipeline);
            a detached copy is kept for the CFG combination of the same step."""
            out = unet(z.to(unet.dtype), t, encoder_hidden_states=cond, return_dict=False)[0].float()
            keep["cond"] = out.detach()
            return out

        step_losses: list[torch.Tensor] = []
        x0, done, interrupted = latents, 0, False
        try:
            for i, t in enumerate(timesteps):
                z = scheduler.scale_model_input(latents, t)
                alpha_bar = frame.alpha_bar(scheduler, i, t)
                full = i in to_guide and s.guidance_gradient == "full"
                out = None if full else denoise(z.to(unet.dtype), t)
                loss = None
                if i in to_guide:
                    keep: dict = {}
                    model = (lambda zz, t=t: conditional(zz, t, keep)) if full else None
                    grad, loss = clip_gradient(z, out, alpha_bar, prediction, decode=self._guidance_decode,
                                               loss_fn=clip_loss, step=i, generator=clip_gen, model=model,
                                               loss_scale=loss_scale)
                    if full:
                        out = denoise(z.to(unet.dtype), t, out_cond=keep["cond"])
                    delta_eps = s.clip_guidance_scale * (1 - alpha_bar).sqrt() * grad   # Dhariwal & Nichol eq. 14
                    out = out + output_correction(delta_eps, alpha_bar, prediction)
                    step_losses.append(loss.per_image.detach().mean())
                x0 = clean_estimate(z, out, alpha_bar, prediction)
                latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
                done = i + 1
                if done == n:
                    x0 = latents
                if callback is not None:
                    info = StepInfo(step=i, total=n, latents=latents, decode=lambda x=x0: self.decode(x),
                                    loss=None if loss is None else loss.total.detach(),
                                    parts={} if loss is None else loss.parts)
                    if callback(info) is False:
                        interrupted = True
                        break
        except KeyboardInterrupt:     # Ctrl-C: keep the latest clean estimate as the result
            interrupted = True
        images = self.decode(x0).float().cpu()
        pipe.maybe_free_model_hooks()
        info = {
            "backend": self.name, "seed": int(seed), "steps_done": done, "prompt": prompt, "negative_prompt": s.negative_prompt,
            "scheduler": type(scheduler).__name__, "prediction_type": prediction, "num_steps": n,
            "timesteps": [float(t) for t in timesteps], "guided_steps": sorted(to_guide),
            "guidance_gradient": s.guidance_gradient if guide else None,
            "clip_guidance_scale": s.clip_guidance_scale if guide else 0.0, "cfg_scale": s.cfg_scale,
            "width": self.width, "height": self.height, "sd_model": s.sd_model,
            "seconds": time.perf_counter() - started,
        }
        return GenerationResult(images=images, losses=[float(v) for v in step_losses], info=info,
                                interrupted=interrupted)


def _to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


# -- loading -----------------------------------------------------------------------------------------
def _check_settings(s: Settings, device: torch.device) -> None:
    if s.scheduler != "default" and s.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {s.scheduler!r}; choose from {', '.join(SCHEDULERS)} or default")
    if s.guidance_gradient not in GRADIENT_MODES:
        raise ValueError(f"unknown guidance_gradient {s.guidance_gradient!r}; choose x0 or full")
    if s.steps < 1:
        raise ValueError(f"steps is {s.steps}; use at least 1")
    if s.num_images < 1:
        raise ValueError(f"num_images is {s.num_images}; use at least 1")
    if not 0.0 <= s.guidance_start < s.guidance_end <= 1.0:
        raise ValueError(f"guidance window [{s.guidance_start}, {s.guidance_end}) is empty or outside [0, 1]; "
                         "use 0 <= --guidance-start < --guidance-end <= 1")
    if s.guidance_every < 1:
        raise ValueError(f"guidance_every is {s.guidance_every}; use 1 (every step) or more")
    if s.init_image:
        from guidance.prompts import check_image_file

        check_image_file(s.init_image)
        if not 0.0 < s.strength <= 1.0:
            raise ValueError(f"strength is {s.strength}; use a value in (0, 1] (1 re-noises the init image fully)")
    if s.cpu_offload and device.type != "cuda":
        raise ValueError(f"--cpu-offload needs a CUDA device, but the device is {device.type}; drop --cpu-offload")


def _build_scheduler(name: str, config):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    try:
        return cls.from_config(config)
    except ImportError as err:   # LMS needs scipy
        raise ImportError(f"--scheduler {name} needs an extra package: {str(err).strip().splitlines()[-1]}") from None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name \
        or name.endswith(SINGLE_FILE_SUFFIXES)


def _first_line(err: Exception, limit: int = 160) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[:limit].rstrip() + "..."


def _load_error(kind: str, name: str, err: Exception) -> OSError:
    first = _first_line(err)
    return OSError(f"could not load {kind} {name!r}: {first}. If you are offline, download it first "
                   f"(`hf download {name}`) and pass the local folder")


def load_pipeline(spec: str, *, dtype: torch.dtype = torch.float32, config: str | None = None):
    """A ``StableDiffusionPipeline`` from a Hub id, a diffusers folder or a single checkpoint file
    (safety checker never loaded; ``.ckpt`` files are read with ``weights_only=True``)."""
    from diffusers import StableDiffusionPipeline

    path = Path(spec).expanduser()
    common = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if spec.endswith(SINGLE_FILE_SUFFIXES):
        if not path.is_file():
            raise FileNotFoundError(f"Stable Diffusion checkpoint file {spec!r} does not exist; give an existing "
                                    ".safetensors/.ckpt file, a diffusers folder or a Hub id")
        extra = {"config": config} if config else {}
        try:
            return StableDiffusionPipeline.from_single_file(str(path), **common, **extra)
        except (OSError, ValueError) as err:
            raise OSError(f"could not load single-file checkpoint {spec!r}: {_first_line(err)}; offline, also "
                          "pass --sd-config "
                          "with a local diffusers folder of the same model type (it supplies the configs)") from None
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{spec!r} is not a diffusers pipeline folder (no model_index.json); "
                                    "point --sd at the folder that `save_pretrained` or `hf download` wrote")
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"Stable Diffusion model folder {spec!r} does not exist; give a Hub id such as "
                                "'stable-diffusion-v1-5/stable-diffusion-v1-5' or an existing local folder")
    try:
        return StableDiffusionPipeline.from_pretrained(str(path) if path.exists() else spec,
                                                       feature_extractor=None, **common)
    except (OSError, ValueError) as err:
        raise _load_error("Stable Diffusion model", spec, err) from None


_PIPELINE_CACHE: dict[tuple, Any] = {}
_PIPELINE_CACHE_SIZE = 1


def cached_pipeline(spec: str, *, dtype: torch.dtype = torch.float32, config: str | None = None):
    """:func:`load_pipeline`, reused across runs for the same (model, dtype, config); one is kept."""
    path = Path(spec).expanduser()
    marker = path / "model_index.json" if path.is_dir() else path
    stamp = (marker.stat().st_mtime_ns, marker.stat().st_size) if marker.exists() else None
    key = (str(path.resolve()) if path.exists() else spec, stamp, str(dtype), config)
    if key not in _PIPELINE_CACHE:
        pipe = load_pipeline(spec, dtype=dtype, config=config)
        pipe.__dict__["_clipsteer_default_scheduler"] = pipe.scheduler
        while len(_PIPELINE_CACHE) >= _PIPELINE_CACHE_SIZE:
            _PIPELINE_CACHE.pop(next(iter(_PIPELINE_CACHE)))
        _PIPELINE_CACHE[key] = pipe
    return _PIPELINE_CACHE[key]


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
                         "VAE made for this model family (taesd for SD 1.x/2.x)")
