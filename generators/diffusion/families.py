"""Diffusion model families behind one small seam: SD 1.x/2.x, SDXL (and SDXL-Turbo), SD3/3.5, FLUX.1.

A :class:`Family` adapts one diffusers pipeline class to the sampling loops (``sd`` guided sampling,
``noise`` rendering). It prepares the conditioning, the starting latents and the timesteps with the
pipeline's *own* methods (``encode_prompt``, ``_get_add_time_ids``, ``prepare_latents``,
``_prepare_latent_image_ids``, the pipeline module's ``retrieve_timesteps`` / ``calculate_shift``),
runs the denoiser (UNet or transformer), and turns final latents into the VAE's input
(``_unpack_latents``, scaling and shift factors). The family is found from the model itself: the
``_class_name`` of its ``model_index.json``, the keys of a single-file checkpoint (diffusers'
``infer_diffusers_model_type``), or the class of a pipeline object; never from a flag.

Guiders see every family in the variance-preserving (VP) frame ``z = sqrt(ab) x0 + sqrt(1-ab) eps``:

- DDPM families (SD, SDXL) predict eps / v / x0 and their schedulers give ``ab`` (:mod:`generators.diffusion.tables`);
- rectified-flow families (SD3, FLUX) sample ``x_t = (1-t) x0 + t eps`` (``t`` the
  ``FlowMatchEulerDiscreteScheduler`` sigma) and predict the velocity ``v = eps - x0``; the clean
  estimate is ``x0 = x_t - t v``. Their VP view is ``z = x_t / r_t`` with ``r_t = sqrt((1-t)^2 + t^2)``
  and ``ab = (1-t)^2 / r_t^2``; guiders get the clean estimate as a ``"sample"`` prediction, and the
  corrected clean estimate ``x0'`` goes back to the scheduler as the velocity ``v' = (x_t - x0') / t``
  (so guidance corrects the velocity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

# ``ab`` of a flow step is clamped to this floor: at t = 1 (pure noise) the clean estimate carries no
# information about z, and corrections written as ``sqrt((1-ab)/ab)`` stay finite.
FLOW_MIN_ALPHA_BAR = 1e-6


@dataclass
class Conditioning:
    """The denoiser's keyword arguments: ``both`` for the CFG batch ``[uncond, cond]`` (``cond`` alone
    without CFG), ``cond`` and ``uncond`` for one half each (``uncond`` is ``None`` without CFG)."""

    both: dict[str, Any]
    cond: dict[str, Any]
    uncond: dict[str, Any] | None
    cfg: bool
    weights: tuple[float, ...] = ()     # composable prompts: ``cond`` holds one batch per part, these weights


def compose(parts: list[Conditioning], weights: list[float]) -> Conditioning:
    """Composable prompts: the first part's unconditional batch, then every part's conditional batch."""
    cond = parts[0].cond
    for part in parts[1:]:
        cond = _cat(cond, part.cond)
    uncond = parts[0].uncond
    return Conditioning(both=_cat(uncond, cond) if uncond is not None else cond, cond=cond, uncond=uncond,
                        cfg=uncond is not None, weights=tuple(float(w) for w in weights))


class Family:
    """One model family; subclasses override what differs from SD 1.x/2.x."""

    name: ClassVar[str] = "sd"
    label: ClassVar[str] = "SD 1.x/2.x"
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    flow: ClassVar[bool] = False            # rectified flow (velocity prediction, FlowMatchEulerDiscreteScheduler)
    denoiser_name: ClassVar[str] = "unet"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    load_kwargs: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None}
    single_file_kwargs: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}

    def __init__(self, pipe):
        self.pipe = pipe
        self._extra: dict[str, Any] = {}

    # -- the models ---------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def compute_modules(self) -> list[torch.nn.Module]:
        """The modules that run in the requested dtype (the VAE always runs in float32)."""
        return [m for m in (getattr(self.pipe, n, None) for n in (self.denoiser_name, *self.text_encoders))
                if m is not None]

    def check(self, spec: str) -> None:
        """One line for a checkpoint of this family that is not text-to-image."""
        unet = self.pipe.unet
        if unet.config.in_channels != self.pipe.vae.config.latent_channels:
            raise ValueError(f"{spec!r} has a {unet.config.in_channels}-channel UNet (an inpainting or depth "
                             f"model?); use a text-to-image {self.label} checkpoint")

    def native_size(self) -> int:
        """Pixels of a side at the model's native resolution."""
        native = self.denoiser.config.sample_size
        native = native if isinstance(native, int) else native[0]
        return int(native) * int(self.pipe.vae_scale_factor)

    def size_multiple(self) -> int:
        return max(8, int(self.pipe.vae_scale_factor))

    def uses_cfg(self, cfg_scale: float) -> bool:
        return cfg_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    # -- conditioning, latents, timesteps -------------------------------------------------------------
    def encode(self, prompt: str, negative: str, num_images: int, cfg: bool, device, *, height: int,
               width: int) -> Conditioning:
        cond, uncond = self.pipe.encode_prompt(prompt, device, num_images, cfg, negative or None)
        return _conditioning({"encoder_hidden_states": cond},
                             {"encoder_hidden_states": uncond} if cfg else None)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of the sampler's latents (what ``prepare_latents`` returns)."""
        scale = int(self.pipe.vae_scale_factor)
        return (batch, self.denoiser.config.in_channels, height // scale, width // scale)

    def start_latents(self, batch: int, height: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
        """Pure noise as the pipeline's ``prepare_latents`` draws it (float32), scaled for the scheduler."""
        return self.pipe.prepare_latents(batch, self.denoiser.config.in_channels, height, width, torch.float32,
                                         device, generator)

    def noise_scale(self, scheduler) -> float:
        """The factor between unit Gaussian noise and the scheduler's starting sample."""
        return float(scheduler.init_noise_sigma)

    def set_timesteps(self, scheduler, steps: int, device, *, height: int, width: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        return scheduler.timesteps

    # -- the denoiser ------------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, t, kwargs: dict) -> torch.Tensor:
        """The denoiser's output on sample-frame input *x* (float32), in the model's own parametrisation."""
        unet = self.pipe.unet
        return unet(x.to(unet.dtype), t, **kwargs, return_dict=False)[0].float()

    # -- decoding ----------------------------------------------------------------------------------------
    def vae_latents(self, latents: torch.Tensor, *, height: int, width: int, vae=None) -> torch.Tensor:
        """The sampler's final latents as the input of *vae*'s decoder (float32; default: the pipeline's VAE;
        an ``AutoencoderTiny`` such as taesd, taesdxl, taesd3 or taef1 has its own scaling and shift factors)."""
        return latents.float() / (vae or self.pipe.vae).config.scaling_factor


class SDXLFamily(Family):
    """SDXL / SDXL-Turbo: two CLIP text encoders, pooled embeddings and the added time ids."""

    name, label, pipeline_class = "sdxl", "SDXL", "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    load_kwargs: ClassVar[dict] = {"add_watermarker": False}
    single_file_kwargs: ClassVar[dict] = {"add_watermarker": False}

    def encode(self, prompt, negative, num_images, cfg, device, *, height, width):
        pipe = self.pipe
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=num_images, do_classifier_free_guidance=cfg,
            negative_prompt=negative or None)
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                     text_encoder_projection_dim=projection).to(device).repeat(num_images, 1)

        def kwargs(embeds, pooled_embeds):
            return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled_embeds,
                                                                           "time_ids": ids}}

        return _conditioning(kwargs(cond, pooled), kwargs(uncond, uncond_pooled) if cfg else None)

    def vae_latents(self, latents, *, height, width, vae=None):
        cfg = (vae or self.pipe.vae).config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, len(mean), 1, 1)
            mean = torch.tensor(mean, device=latents.device).view(view)
            std = torch.tensor(std, device=latents.device).view(view)
            return latents.float() * std / cfg.scaling_factor + mean
        return super().vae_latents(latents, height=height, width=width, vae=vae)


class FlowFamily(Family):
    """Rectified-flow transformers (``FlowMatchEulerDiscreteScheduler``, velocity prediction)."""

    flow = True
    denoiser_name = "transformer"
    load_kwargs: ClassVar[dict] = {}
    single_file_kwargs: ClassVar[dict] = {}

    def check(self, spec: str) -> None:
        name = type(self.pipe.scheduler).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{spec!r} ({self.label}) comes with scheduler {name}; clipsteer samples {self.label} "
                             "with FlowMatchEulerDiscreteScheduler (the model's own)")

    def uses_cfg(self, cfg_scale):
        return cfg_scale > 1

    def noise_scale(self, scheduler):
        return 1.0

    def set_timesteps(self, scheduler, steps, device, *, height, width):
        module = self._module()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self._mu(scheduler, height, width)
        timesteps, _ = module.retrieve_timesteps(scheduler, steps, device, sigmas=self._sigmas(scheduler, steps),
                                                 **kwargs)
        return timesteps

    def _sigmas(self, scheduler, steps):
        return None

    def _module(self):
        import importlib

        return importlib.import_module(type(self.pipe).__module__)

    def _mu(self, scheduler, height: int, width: int) -> float:
        shape = self.latent_shape(1, height, width)
        patch = self.denoiser.config.patch_size
        seq = shape[1] if len(shape) == 3 else (shape[2] // patch) * (shape[3] // patch)
        c = scheduler.config
        return self._module().calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                              c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    def vae_latents(self, latents, *, height, width, vae=None):
        cfg = (vae or self.pipe.vae).config
        return latents.float() / cfg.scaling_factor + getattr(cfg, "shift_factor", 0.0)


class SD3Family(FlowFamily):
    """SD3 / SD3.5: two CLIP encoders with projections and T5; MMDiT on (encoder_hidden_states, pooled)."""

    name, label, pipeline_class = "sd3", "SD3/3.5", "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def size_multiple(self):
        return max(8, int(self.pipe.vae_scale_factor) * int(self.denoiser.config.patch_size))

    def encode(self, prompt, negative, num_images, cfg, device, *, height, width):
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=cfg, negative_prompt=negative or None)
        return _conditioning({"encoder_hidden_states": cond, "pooled_projections": pooled},
                             {"encoder_hidden_states": uncond, "pooled_projections": uncond_pooled} if cfg else None)

    def predict(self, x, t, kwargs):
        model = self.pipe.transformer
        timestep = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        return model(hidden_states=x.to(model.dtype), timestep=timestep, **kwargs, return_dict=False)[0].float()


class FluxFamily(FlowFamily):
    """FLUX.1 schnell / dev: CLIP pooled + T5 embeddings, packed 2x2 latents with position ids; no CFG.
    Guidance-distilled models (dev: ``guidance_embeds``) take their guidance value as an input."""

    name, label, pipeline_class = "flux", "FLUX.1", "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe, *, guidance: float = 3.5):
        super().__init__(pipe)
        self.guidance = float(guidance)

    @property
    def distilled_guidance(self) -> bool:
        return bool(self.pipe.transformer.config.guidance_embeds)

    def uses_cfg(self, cfg_scale):
        return False

    def native_size(self):
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

    def size_multiple(self):
        return max(16, int(self.pipe.vae_scale_factor) * 2)

    def _latent_hw(self, height: int, width: int) -> tuple[int, int]:
        scale = int(self.pipe.vae_scale_factor)
        return 2 * (int(height) // (scale * 2)), 2 * (int(width) // (scale * 2))

    def latent_shape(self, batch, height, width):
        h, w = self._latent_hw(height, width)
        return (batch, (h // 2) * (w // 2), self.pipe.transformer.config.in_channels)

    def start_latents(self, batch, height, width, generator, device):
        latents, _ = self.pipe.prepare_latents(batch, self.pipe.transformer.config.in_channels // 4, height, width,
                                               torch.float32, device, generator)
        return latents

    def encode(self, prompt, negative, num_images, cfg, device, *, height, width):
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                           num_images_per_prompt=num_images)
        h, w = self._latent_hw(height, width)
        image_ids = self.pipe._prepare_latent_image_ids(num_images, h // 2, w // 2, device, embeds.dtype)
        kwargs = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
                  "img_ids": image_ids}
        return _conditioning(kwargs, None)

    def _sigmas(self, scheduler, steps):
        import numpy as np

        if scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / steps, steps)

    def predict(self, x, t, kwargs):
        model = self.pipe.transformer
        timestep = torch.as_tensor(t, device=x.device).expand(x.shape[0]).to(x.dtype)
        guidance = (torch.full([x.shape[0]], self.guidance, device=x.device, dtype=torch.float32)
                    if self.distilled_guidance else None)
        return model(hidden_states=x.to(model.dtype), timestep=timestep / 1000, guidance=guidance, **kwargs,
                     return_dict=False)[0].float()

    def vae_latents(self, latents, *, height, width, vae=None):
        unpacked = self.pipe._unpack_latents(latents.float(), height, width, self.pipe.vae_scale_factor)
        return super().vae_latents(unpacked, height=height, width=width, vae=vae)


def _conditioning(cond: dict, uncond: dict | None) -> Conditioning:
    if uncond is None:
        return Conditioning(both=cond, cond=cond, uncond=None, cfg=False)
    return Conditioning(both=_cat(uncond, cond), cond=cond, uncond=uncond, cfg=True)


def _cat(a, b):
    """``[a, b]`` along the batch, through nested dicts."""
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b])


# -- the registry and detection -------------------------------------------------------------------------
FAMILIES: dict[str, type[Family]] = {cls.pipeline_class: cls for cls in (Family, SDXLFamily, SD3Family, FluxFamily)}
# diffusers' single-file model types (``infer_diffusers_model_type``) -> pipeline class
SINGLE_FILE_TYPES = {"v1": "StableDiffusionPipeline", "v2": "StableDiffusionPipeline",
                     "xl_base": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
                     "sd35_medium": "StableDiffusion3Pipeline", "sd35_large": "StableDiffusion3Pipeline",
                     "flux-dev": "FluxPipeline", "flux-schnell": "FluxPipeline"}


def supported() -> str:
    return ", ".join(f"{cls.pipeline_class} ({cls.label})" for cls in FAMILIES.values())


def family_class(pipeline_class: str, spec: str = "the model") -> type[Family]:
    """The family of a diffusers pipeline class name; one line naming it and the supported ones otherwise."""
    if pipeline_class not in FAMILIES:
        raise ValueError(f"{spec!r} is a {pipeline_class} model, which clipsteer does not support; supported: "
                         f"{supported()}")
    return FAMILIES[pipeline_class]


def family_of(pipe, **options) -> Family:
    """The :class:`Family` adapter of a built pipeline (by its class or the nearest supported base class)."""
    for klass in type(pipe).__mro__:
        if klass.__name__ in FAMILIES:
            cls = FAMILIES[klass.__name__]
            return cls(pipe, **options) if cls is FluxFamily else cls(pipe)
    family_class(type(pipe).__name__, "the pipeline given")
    raise AssertionError("unreachable")


def pipeline_class_of(spec: str, path: Path, single_file: bool) -> str:
    """The diffusers pipeline class of a model: ``model_index.json``'s ``_class_name`` (folder or Hub id), or,
    for one checkpoint file, what diffusers infers from its keys."""
    if single_file:
        return SINGLE_FILE_TYPES.get(single_file_type(path), f"(single file of type {single_file_type(path)})")
    if path.exists():
        config = json.loads((path / "model_index.json").read_text())
    else:
        from diffusers import DiffusionPipeline

        config = DiffusionPipeline.load_config(spec)
    return str(config.get("_class_name", "(no _class_name)"))


def single_file_type(path: Path) -> str:
    """diffusers' model type of a ``.safetensors``/``.ckpt`` checkpoint, read without loading every tensor
    (``.ckpt`` files are opened with ``weights_only=True``)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    return infer_diffusers_model_type(_LazyCheckpoint(path))


@dataclass
class _LazyCheckpoint:
    """A read-only mapping over a checkpoint's tensors that loads a tensor only when it is looked at."""

    path: Path
    _keys: list[str] = field(default_factory=list)
    _state: dict | None = None

    def __post_init__(self):
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                self._keys = list(f.keys())
        else:
            try:     # zip checkpoints are memory-mapped; the legacy format is read whole
                state = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(str(self.path), map_location="cpu", weights_only=True)
            self._state = state.get("state_dict", state)
            self._keys = list(self._state)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def keys(self):
        return list(self._keys)

    def __getitem__(self, key):
        if self._state is not None:
            return self._state[key]
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)



def composable_parts(prompt: str, schedule=None) -> list[tuple[str, float]]:
    """(text, weight) of each part of a composable prompt: the prompt schedule's text prompts at step 0 (else
    *prompt*'s '|' parts); one part with `` AND `` in it is split there (A1111's syntax: "a cat AND a dog")."""
    from guidance.prompts import parse_prompts

    parts = ([(p.value, p.weight) for p in schedule.at(0) if p.kind == "text"] if schedule is not None
             else [(p.value, p.weight) for p in parse_prompts(prompt)])
    if len(parts) == 1 and " AND " in parts[0][0]:
        parts = [(text.strip(), parts[0][1]) for text in parts[0][0].split(" AND ") if text.strip()]
    return parts


def check_composable(weights: list[float], cfg: bool) -> None:
    """One line for composable prompts that cannot be combined."""
    if not cfg:
        raise ValueError("--composable combines classifier-free guidance directions, but this run has no CFG; "
                         "use --cfg-scale above 1 (or drop --composable)")
    if sum(weights) <= 0:
        raise ValueError(f"--composable prompt weights {weights} sum to {sum(weights):g}; the positive parts must "
                         "outweigh the negative ones (e.g. 'a red circle:1|a blue square:1|blurry:-0.5')")

__all__ = ["check_composable", "composable_parts", 
    "FAMILIES",
    "FLOW_MIN_ALPHA_BAR",
    "Conditioning",
    "Family",
    "FlowFamily",
    "FluxFamily",
    "SD3Family",
    "SDXLFamily",
    "family_class",
    "family_of",
    "pipeline_class_of",
    "supported",
]
