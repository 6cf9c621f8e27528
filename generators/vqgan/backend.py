"""VQGAN + CLIP: optimise a VQGAN latent so the decoded image matches the prompts.

Follows Crowson's VQGAN+CLIP method (Crowson et al. 2022, "VQGAN-CLIP: Open Domain Image
Generation and Editing with Natural Language Guidance"): a latent grid ``z`` in codebook
space is snapped to its nearest codes with a straight-through estimator, decoded by a
taming-transformers VQGAN, and moved by a torch optimiser down the gradient of a
``guidance.CLIPLoss``; after every step ``z`` is clamped into the codebook's per-dimension
range. Models load from a name in :data:`KNOWN_MODELS` (fetched once from the Hugging Face
Hub), a local folder, or explicit config + checkpoint paths; checkpoints are read without
running their pickles (see :mod:`generators.vqgan.taming`).

Sizes must be multiples of the model's downsampling factor (16 for the f16 models): other
sizes raise a ``ValueError`` that names the nearest valid ones, rather than being rounded
silently.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from guidance.errors import first_line
from guidance.losses import clamp_with_grad  # noqa: F401  (re-exported)

from ..base import GenerationResult, Generator, StepCallback, option, seed_generator
from ..optimise import (LR_SCHEDULES, OPTIMIZERS, OptimiseSettings, check_settings, make_lr_schedule,
                       make_optimizer, optimise)
from .taming import FirstStage, TamingConfig, build_first_stage, load_state_dict

# name -> (Hub repo, config file, weights file). Each was checked to exist and to hold a
# taming-format config + Lightning checkpoint; see the report of issue 3 for the sources.
KNOWN_MODELS: dict[str, tuple[str, str, str]] = {
    "imagenet_f16_16384": ("Somnai/pytti-vqgan-checkpoints", "imagenet/imagenet.yaml", "imagenet/imagenet.ckpt"),
    "wikiart_f16_16384": ("Somnai/pytti-vqgan-checkpoints", "wikiart/wikiart.yaml", "wikiart/wikiart.ckpt"),
    "imagenet_f16_1024": ("Nehc/vqgan_imagenet_f16_1024", "configs/model.yaml", "ckpts/last.ckpt"),
    "openimages_f8_8192": ("neggles/vaedump", "taming/vq-gumbel-f8-8192/config.yaml",
                           "taming/vq-gumbel-f8-8192/model.ckpt"),
    "cc3m_yfcc_f16_16384": ("boris/vqgan_f16_16384", "config.yaml", "model.ckpt"),
}
# Names used by nerdyrodent's VQGAN-CLIP and other tools.
MODEL_ALIASES = {
    "vqgan_imagenet_f16_16384": "imagenet_f16_16384", "imagenet": "imagenet_f16_16384",
    "imagenet_16384": "imagenet_f16_16384",
    "vqgan_imagenet_f16_1024": "imagenet_f16_1024", "imagenet_1024": "imagenet_f16_1024",
    "wikiart_16384": "wikiart_f16_16384", "wikiart": "wikiart_f16_16384",
    "vqgan_gumbel_f8_8192": "openimages_f8_8192", "gumbel_8192": "openimages_f8_8192",
    "openimages": "openimages_f8_8192", "gumbel": "openimages_f8_8192",
    "vqgan_f16_16384": "cc3m_yfcc_f16_16384",
}

INIT_NOISES = ("pixels", "gradient")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

@dataclass
class VQGANSettings(OptimiseSettings):
    """Options of the VQGAN backend (each becomes a CLI option and a config-file key)."""

    vqgan: str = option("imagenet_f16_16384", f"VQGAN: a known name ({', '.join(KNOWN_MODELS)}; downloaded once "
                        "from the Hugging Face Hub), a folder holding a taming config.yaml + model.safetensors or "
                        "last.ckpt, or a .ckpt/.safetensors file with its YAML beside it", flag="--vqgan",
                        metavar="NAME_OR_PATH", path="model")
    vqgan_config: str | None = option(None, "taming config YAML for --vqgan when it is not beside the checkpoint",
                                      metavar="YAML")
    width: int = option(256, "image width in pixels (VQGAN: a multiple of its downsampling factor, e.g. 16)")
    height: int = option(256, "image height in pixels (VQGAN: a multiple of its downsampling factor)")
    num_images: int = option(1, "images optimised together as one batch, each from its own random start",
                             minimum=1)
    init_image: str | None = option(None, "start from this image (encoded by the VQGAN) instead of random codes",
                                    metavar="PATH", path="file")
    init_weight: float = option(0.0, "weight of an MSE pull of the latent back towards its starting point (keeps "
                                     "the init image's layout); 0 disables", minimum=0)
    init_weight_decay: bool = option(False, "let --init-weight fall linearly to zero over the run")
    init_noise: str | None = option(None, "start from an encoded noise image instead of random codes: pixels or "
                                          "gradient", choices=INIT_NOISES)
    channels_last: bool = option(True, "run the decoder in channels-last memory format (f16 decoder: 5-13% faster "
                                       "on CPU; --no-channels-last: contiguous)")


# ---------------------------------------------------------------------------------------------
# Finding and loading models
# ---------------------------------------------------------------------------------------------

def _hub_files(name: str, cache_dir: str | None = None) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download

    repo, config_file, weights_file = KNOWN_MODELS[name]
    paths = []
    for filename in (config_file, weights_file):
        try:
            paths.append(Path(hf_hub_download(repo, filename, cache_dir=cache_dir)))
        except Exception as err:  # offline, dead link, auth, disk...
            kind = err.__class__.__name__
            if kind == "LocalEntryNotFoundError":
                reason = "it is not in the local cache and the Hub could not be reached (offline?)"
            elif kind in ("RepositoryNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"):
                reason = "the Hub no longer has this file (dead link)"
            else:
                reason = f"{kind}: {first_line(err, 150)}"
            raise FileNotFoundError(
                f"could not get VQGAN {name!r} ({repo}, file {filename}) from the Hugging Face Hub: {reason}. "
                f"Download {filename} and {weights_file if filename == config_file else config_file} by hand "
                "into one folder and pass --vqgan FOLDER") from None
    return paths[0], paths[1]


_WEIGHT_NAMES = ("model.safetensors", "last.ckpt", "model.ckpt", "checkpoints/last.ckpt", "ckpts/last.ckpt")
_CONFIG_NAMES = ("config.yaml", "model.yaml", "configs/model.yaml")


def _single(paths: list[Path]) -> Path | None:
    return paths[0] if len(paths) == 1 else None


def resolve_vqgan(spec: str | os.PathLike, *, config: str | os.PathLike | None = None,
                  cache_dir: str | None = None) -> tuple[Path, Path]:
    """(config YAML, weights file) for a known name, a folder, or a checkpoint file."""
    spec_str = str(spec)
    name = MODEL_ALIASES.get(spec_str.lower(), spec_str.lower())
    path = Path(spec_str).expanduser()
    if not path.exists() and name in KNOWN_MODELS:
        cfg, weights = _hub_files(name, cache_dir)
        return (Path(config) if config else cfg), weights
    if path.is_dir():
        weights = next((path / n for n in _WEIGHT_NAMES if (path / n).is_file()), None)
        weights = weights or _single(sorted(path.glob("*.safetensors"))) or _single(sorted(path.glob("*.ckpt")))
        if weights is None:
            raise FileNotFoundError(f"VQGAN folder {spec_str!r} has no weights; put model.safetensors or "
                                    "last.ckpt (taming format) in it")
        cfg = Path(config) if config else next((path / n for n in _CONFIG_NAMES if (path / n).is_file()), None)
        cfg = cfg or _single(sorted(path.glob("*.yaml")))
        if cfg is None:
            raise FileNotFoundError(f"VQGAN folder {spec_str!r} has no config; put the taming config.yaml in it "
                                    "or pass --vqgan-config YAML")
        return cfg, weights
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            raise ValueError(f"--vqgan {spec_str!r} is a config file; pass the checkpoint (or its folder) as "
                             "--vqgan and the YAML as --vqgan-config")
        from .taming import _config_beside

        cfg = Path(config) if config else _config_beside(path)
        if cfg is None:
            raise FileNotFoundError(f"no taming config YAML found beside {spec_str!r}; put it next to the "
                                    "checkpoint (same name, .yaml) or pass --vqgan-config YAML")
        return cfg, path
    known = ", ".join(KNOWN_MODELS)
    raise FileNotFoundError(f"VQGAN {spec_str!r} is neither a known model ({known}) nor an existing file or "
                            "folder; check the name or path")


def load_vqgan(spec: str | os.PathLike, *, config: str | os.PathLike | None = None,
               cache_dir: str | None = None) -> FirstStage:
    """Load a VQGAN (name, folder or checkpoint; see :func:`resolve_vqgan`); kept in the model cache per file."""
    from guidance.cache import cached

    cfg_path, weights = resolve_vqgan(spec, config=config, cache_dir=cache_dir)
    stat = weights.stat()
    key = (str(cfg_path.resolve()), str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
    return cached("vqgan", key, lambda: build_first_stage(TamingConfig.from_yaml(cfg_path), load_state_dict(weights)))


def toy_preset() -> dict:
    """This backend's part of ``--preset toy``: the toy VQGAN and the settings tuned for it on the toy
    world's tuning prompts (benchmarks/quality.py --prompt-seed 7)."""
    from ..runs.presets import toyworld_weights

    # tv_weight: the factor-2 toy VQGAN decodes 2x2-pixel codes, so CLIP's gradient speckles the image; a total-
    # variation term (weight chosen on the tuning prompts: 3/40 right against 1/40 without, 0/40 at 0.5, 1/40 at
    # 60) keeps flat regions flat
    return {"vqgan": str(toyworld_weights("vqgan", check=True)), "iterations": 100, "learning_rate": 0.3,
            "tv_weight": 20.0}


# ---------------------------------------------------------------------------------------------
# Pieces of the optimisation
# ---------------------------------------------------------------------------------------------

def check_size(width: int, height: int, factor: int) -> None:
    """Raise a ``ValueError`` naming the nearest valid sizes unless both are multiples of *factor*."""
    for label, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be a whole number of pixels; got {value!r}")
        if value >= factor and value % factor == 0:
            continue
        lower = (value // factor) * factor
        options = sorted((v for v in (lower, lower + factor) if v >= factor), key=lambda v: (abs(v - value), v))
        options = options or [factor]          # zero or negative sizes: the smallest valid one
        raise ValueError(f"{label} {value} does not suit this VQGAN: it must be a multiple of {factor} "
                         f"(its downsampling factor); use {' or '.join(map(str, options))}")


def straight_through_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code vectors in the forward pass, identity gradient to ``z`` (van den Oord et al.
    2017, VQ-VAE's straight-through estimator). ``z`` is ``[B, D, H, W]``, codebook ``[N, D]``."""
    from .taming import nearest_code

    with torch.no_grad():
        index = nearest_code(z, codebook)
    z_q = codebook[index].permute(0, 3, 1, 2)
    return z + (z_q - z).detach()


def noise_images(kind: str, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded start images in ``[0,1]``: ``pixels`` (uniform per-pixel colour noise) or ``gradient``
    (a linear blend between two random colours in a random direction)."""
    if kind == "pixels":
        return torch.rand(batch, 3, height, width, generator=generator)
    if kind == "gradient":
        colours = torch.rand(batch, 2, 3, 1, 1, generator=generator)
        angle = torch.rand(batch, generator=generator) * 2 * math.pi
        ys = torch.linspace(-1, 1, height).view(1, height, 1)
        xs = torch.linspace(-1, 1, width).view(1, 1, width)
        t = xs * angle.cos().view(-1, 1, 1) + ys * angle.sin().view(-1, 1, 1)
        t = ((t - t.amin((1, 2), keepdim=True)) / (t.amax((1, 2), keepdim=True) - t.amin((1, 2), keepdim=True))
             .clamp_min(1e-6)).unsqueeze(1)
        return colours[:, 0] * (1 - t) + colours[:, 1] * t
    raise ValueError(f"unknown init_noise {kind!r}; choose from {', '.join(INIT_NOISES)}")


def _load_init_image(path: str, width: int, height: int) -> torch.Tensor:
    from guidance.images import load_image

    return load_image(path, (width, height), what="init image")


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------

class VQGANGenerator(Generator):
    """VQGAN+CLIP: Adam (or any torch optimiser) on a straight-through-quantised VQGAN latent."""

    name = "vqgan"
    Settings = VQGANSettings
    presets = {"toy": toy_preset}
    needs_objective = True
    resumable = True

    def __init__(self, settings: VQGANSettings | None = None, *, device=None, precision=None,
                 model: FirstStage | None = None):
        super().__init__(settings, device=device, precision=precision)
        s = self.settings
        self._validate(s)
        if model is None:
            self.check(s)    # size against the config, init image: before the heavy load
            model = load_vqgan(s.vqgan, config=s.vqgan_config)
        check_size(s.width, s.height, model.downsample)
        # Layout set both ways: the model may be a cached one a previous run converted.
        layout = torch.channels_last if s.channels_last else torch.contiguous_format
        self.model = model.to(self.device).eval().requires_grad_(False).to(memory_format=layout)
        codebook = self.model.codebook.detach().float()
        self.codebook = codebook
        self.z_min = codebook.amin(0).view(1, -1, 1, 1)
        self.z_max = codebook.amax(0).view(1, -1, 1, 1)
        if s.init_image:
            self._init_pixels = _load_init_image(s.init_image, s.width, s.height)  # fails early if unreadable
        else:
            self._init_pixels = None

    @classmethod
    def check(cls, settings: VQGANSettings, device=None) -> None:
        cls._validate(settings)
        cfg_path, _ = resolve_vqgan(settings.vqgan, config=settings.vqgan_config)
        check_size(settings.width, settings.height, TamingConfig.from_yaml(cfg_path).downsample)
        if settings.init_image:
            from guidance.images import check_image_file

            check_image_file(settings.init_image, what="init image")

    @staticmethod
    def _validate(s: VQGANSettings) -> None:
        check_settings(s)
        if s.num_images < 1:
            raise ValueError(f"num_images is {s.num_images}; it must be at least 1")
        if s.init_noise is not None and s.init_noise not in INIT_NOISES:
            raise ValueError(f"unknown init_noise {s.init_noise!r}; choose from {', '.join(INIT_NOISES)}")
        if s.init_weight < 0:
            raise ValueError(f"init_weight is {s.init_weight}; it must be 0 or more")

    # -- latents ---------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        s, f = self.settings, self.model.downsample
        return (s.num_images, self.codebook.shape[1], s.height // f, s.width // f)

    def _autocast(self):
        from guidance.runtime import autocast

        return autocast(self.device, self.dtype)

    def compile_targets(self) -> list[torch.nn.Module]:
        return [self.model.decoder]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in ``[0,1]`` -> quantised latents (float32, on the device)."""
        images = images.to(self.device, torch.float32) * 2 - 1
        if self.settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.model.encode(images).float()

    def initial_latents(self, generator: torch.Generator) -> torch.Tensor:
        """The starting ``z``: init image, encoded noise image, or random codebook entries."""
        s = self.settings
        batch, _, h, w = self.latent_shape
        if self._init_pixels is not None:
            return self.encode(self._init_pixels.expand(batch, -1, -1, -1))
        if s.init_noise:
            return self.encode(noise_images(s.init_noise, batch, s.height, s.width, generator))
        index = torch.randint(self.codebook.shape[0], (batch, h, w), generator=generator)
        return self.codebook[index.to(self.codebook.device)].permute(0, 3, 1, 2).contiguous()

    def render(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable: quantise ``z`` (straight-through), decode, map to ``[0,1]`` (unclamped)."""
        z_q = straight_through_quantize(z, self.codebook)
        if self.settings.channels_last:
            z_q = z_q.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            x = self.model.decode(z_q)
        return x.float().add(1).div(2)   # objectives clamp (guidance.clamp_with_grad); --range-weight sees overshoot

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in ``[0,1]`` (float32, CPU) for latents ``z``."""
        return self.render(z.detach()).clamp(0, 1).float().cpu()

    def _init_weight(self, step: int) -> float:
        s = self.settings
        if s.init_weight_decay and s.iterations > 0:
            return s.init_weight * (1 - step / s.iterations)
        return s.init_weight

    # -- the run ---------------------------------------------------------------------------
    def generate(self, objective, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        s = self.settings
        z = self.initial_latents(seed_generator(seed, "init")).to(self.device, torch.float32)
        z_init = z.clone() if s.init_weight else None

        def pull_to_start(z: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
            return {"init": (z - z_init).pow(2).mean((1, 2, 3)) * self._init_weight(step)}

        def into_codebook_range(z: torch.Tensor) -> None:
            z.copy_(torch.maximum(torch.minimum(z, self.z_max), self.z_min))

        out = optimise(z.requires_grad_(True), self.render, objective, optimizer=s.optimizer, lr=s.learning_rate,
                       schedule=s.lr_schedule, steps=s.iterations, project=into_codebook_range,
                       regulariser=pull_to_start if z_init is not None else None, callback=callback,
                       generator=seed_generator(seed, "objective"), decode=self.decode, keep_best=s.keep_best,
                       grad_clip=s.grad_clip, checkpoint=self.checkpoint, grad_scaler=self.grad_scaler())
        info = {"latent_shape": list(z.shape), "downsample": self.model.downsample,
                "codebook_size": int(self.codebook.shape[0]), "gumbel": bool(self.model.gumbel)}
        if out.best_step is not None:
            info["best_step"] = out.best_step
        return GenerationResult(images=self.decode(z), losses=out.losses, info=info, interrupted=out.interrupted,
                                steps_done=out.steps_done, stopped_at=out.stopped_at)


__all__ = ["VQGANGenerator", "VQGANSettings", "KNOWN_MODELS", "MODEL_ALIASES", "OPTIMIZERS", "LR_SCHEDULES",
           "resolve_vqgan", "load_vqgan", "check_size", "make_optimizer", "make_lr_schedule", "clamp_with_grad",
           "straight_through_quantize", "noise_images"]
