"""The diffusers plumbing both diffusion backends (``sd``, ``noise``) use, written once: loading a pipeline
(Hub id, diffusers folder or single checkpoint file; cached across runs), placing its models (frozen, the
VAE in float32, the denoiser and text encoders in the run's dtype), the image size, the scheduler choice,
classifier-free guidance and the differentiable VAE decode."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from guidance.errors import first_line, load_error, looks_like_path, readable_weights

from ..base import option
from .families import family_class, pipeline_class_of

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
# The rectified-flow models' own sampler: its step depends only on the step index, which the loop restores.
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# --scheduler values: a DDPM sampler by name, "default" (the checkpoint's own), "auto" (dpm++ for the DDPM
# families SD 1.x/2.x and SDXL, the model's own flow-matching Euler for SD3 and FLUX)
SCHEDULER_CHOICES = [*SCHEDULERS, "default", "auto"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

def decoder_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype of a VAE decode in the hot loop: the run's half dtype, except fp16 for a VAE whose
    config asks for float32 (``force_upcast``: the SD 1.x/2.x VAE overflows fp16); bf16 has fp32's range."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def build_scheduler(name: str, config):
    """Scheduler *name* (a key of :data:`SCHEDULERS`) built from a pipeline's scheduler *config*."""
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
    SDXL, SD3, FLUX) found from the model (:func:`~generators.diffusion.families.pipeline_class_of`); safety checker never
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


def sd_config_option():
    """The ``--sd-config`` option of both diffusion backends (a fresh field for each ``Settings``)."""
    return option(None, "for a single-file --sd checkpoint: a local diffusers folder or Hub id holding its configs "
                        "(needed offline)", flag="--sd-config", path="model")


def default_scheduler(pipe):
    """The scheduler *pipe* was loaded with (a cached pipeline remembers it; each run starts from that one)."""
    return pipe.__dict__.get("_clipsteer_default_scheduler", pipe.scheduler)


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULER_CHOICES:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}, default or auto")


def choose_scheduler(pipe, family, name: str, *, auto: str | None, fresh: bool = False):
    """The run's scheduler for ``--scheduler`` *name*: a DDPM sampler by name, or the model's own (``default``;
    ``auto`` is *auto* for the DDPM families, the model's own where *auto* is ``None``). Rectified-flow
    families (SD3, FLUX) only sample with their own. *fresh*: a copy of the model's own, never the instance."""
    default = default_scheduler(pipe)
    if family.flow and name not in ("auto", "default"):
        raise ValueError(f"--scheduler {name} is a DDPM sampler; {family.label} is a rectified-flow model "
                         f"sampled with its own {FLOW_SCHEDULER}: use --scheduler auto or default")
    if name == "auto" and auto is not None and not family.flow:
        name = auto
    if name in ("auto", "default"):
        return copy.deepcopy(default) if fresh else default
    return build_scheduler(name, default.config)


def image_size(family, width: int, height: int) -> tuple[int, int]:
    """(width, height) in pixels: 0 is the model's native size; others must be multiples of the VAE's block."""
    native, multiple = family.native_size(), family.size_multiple()
    sizes = []
    for name, value in (("width", width), ("height", height)):
        value = value or native
        if value <= 0 or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValueError(f"{name} {value} is not a positive multiple of {multiple} (the VAE works in "
                             f"{multiple}-pixel blocks); use --{name} {lower} or {lower + multiple}")
        sizes.append(value)
    return sizes[0], sizes[1]


def prepare_models(pipe, family, dtype: torch.dtype) -> None:
    """Every model frozen in eval mode, the VAE in float32 (it decodes and carries the guidance gradient in
    float32, as diffusers' ``force_upcast``), the denoiser and text encoders in *dtype*; no progress bars."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    to_dtype(pipe.vae, torch.float32)
    for module in family.compute_modules():
        to_dtype(module, dtype)
    pipe.set_progress_bar_config(disable=True)


def cfg_combine(out: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: the unconditional and conditional halves of a doubled batch, combined."""
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def vae_decode(vae, family, latents: torch.Tensor, *, dtype: torch.dtype, height: int, width: int) -> torch.Tensor:
    """Differentiable decode of latents to images in about ``[0, 1]``, unclamped (objectives clamp; a range
    penalty sees the overshoot), under autocast in half precision (:func:`decoder_dtype`)."""
    from guidance.runtime import autocast

    with autocast(latents.device, decoder_dtype(vae, dtype)):
        image = vae.decode(family.vae_latents(latents, height=height, width=width, vae=vae), return_dict=False)[0]
    return image.float() / 2 + 0.5
