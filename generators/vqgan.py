"""VQGAN + CLIP: optimise a VQGAN latent so the decoded image matches the prompts.

Follows Crowson's VQGAN+CLIP method (Crowson et al. 2022, "VQGAN-CLIP: Open Domain Image
Generation and Editing with Natural Language Guidance"): a latent grid ``z`` in codebook
space is snapped to its nearest codes with a straight-through estimator, decoded by a
taming-transformers VQGAN, and moved by a torch optimiser down the gradient of a
``guidance.CLIPLoss``; after every step ``z`` is clamped into the codebook's per-dimension
range. Models load from a name in :data:`KNOWN_MODELS` (fetched once from the Hugging Face
Hub), a local folder, or explicit config + checkpoint paths; checkpoints are read without
running their pickles (see :mod:`generators.taming_checkpoint`).

Sizes must be multiples of the model's downsampling factor (16 for the f16 models): other
sizes raise a ``ValueError`` that names the nearest valid ones, rather than being rounded
silently.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import GenerationResult, Generator, StepCallback, StepInfo
from .taming_checkpoint import FirstStage, TamingConfig, build_first_stage, load_state_dict

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

OPTIMIZERS = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad,
    "adamax": torch.optim.Adamax, "radam": torch.optim.RAdam, "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}
LR_SCHEDULES = ("constant", "cosine", "step", "linear")
INIT_NOISES = ("pixels", "gradient")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

@dataclass
class VQGANSettings:
    """Options of the VQGAN backend (each becomes a CLI option and a config-file key)."""

    vqgan: str = field(default="imagenet_f16_16384", metadata={
        "help": f"VQGAN: a known name ({', '.join(KNOWN_MODELS)}; downloaded once from the Hugging Face "
                "Hub), a folder holding a taming config.yaml + model.safetensors or last.ckpt, or a "
                ".ckpt/.safetensors file with its YAML beside it", "flag": "--vqgan", "metavar": "NAME_OR_PATH"})
    vqgan_config: str | None = field(default=None, metadata={
        "help": "taming config YAML for --vqgan when it is not beside the checkpoint", "metavar": "YAML"})
    width: int = field(default=256, metadata={"help": "image width in pixels (VQGAN: a multiple of its "
                                                      "downsampling factor, e.g. 16)"})
    height: int = field(default=256, metadata={"help": "image height in pixels (VQGAN: a multiple of its "
                                                       "downsampling factor)"})
    num_images: int = field(default=1, metadata={"help": "images optimised together as one batch, each "
                                                         "from its own random start"})
    iterations: int = field(default=300, metadata={"help": "optimisation steps", "metavar": "N"})
    learning_rate: float = field(default=0.1, metadata={"help": "optimiser learning rate", "flag": "--lr"})
    optimizer: str = field(default="Adam", metadata={
        "help": "torch optimiser: " + ", ".join(("Adam", "AdamW", "Adagrad", "Adamax", "RAdam", "RMSprop", "SGD")),
        "aliases": ["--optimiser"]})
    lr_schedule: str = field(default="constant", metadata={
        "help": "learning-rate schedule: constant; cosine (to 10% of --lr); step (halve every third of the "
                "run); linear (to 10%)", "choices": list(LR_SCHEDULES)})
    init_image: str | None = field(default=None, metadata={"help": "start from this image (encoded by the "
                                                                   "VQGAN) instead of random codes",
                                                           "metavar": "PATH"})
    init_weight: float = field(default=0.0, metadata={
        "help": "weight of an MSE pull of the latent back towards its starting point (keeps the init "
                "image's layout); 0 disables"})
    init_weight_decay: bool = field(default=False, metadata={
        "help": "let --init-weight fall linearly to zero over the run"})
    init_noise: str | None = field(default=None, metadata={
        "help": "start from an encoded noise image instead of random codes: pixels or gradient",
        "choices": list(INIT_NOISES)})
    channels_last: bool = field(default=True, metadata={"help": "run the decoder in channels-last memory format "
                                                                "(f16 decoder: 5-13% faster on CPU; "
                                                                "--no-channels-last: contiguous)"})


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
                first = str(err).splitlines()[0] if str(err) else ""
                reason = f"{kind}: {first[:150]}{'...' if len(first) > 150 else ''}"
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
        from .taming_checkpoint import _config_beside

        cfg = Path(config) if config else _config_beside(path)
        if cfg is None:
            raise FileNotFoundError(f"no taming config YAML found beside {spec_str!r}; put it next to the "
                                    "checkpoint (same name, .yaml) or pass --vqgan-config YAML")
        return cfg, path
    known = ", ".join(KNOWN_MODELS)
    raise FileNotFoundError(f"VQGAN {spec_str!r} is neither a known model ({known}) nor an existing file or "
                            "folder; check the name or path")


_MODEL_CACHE: dict[tuple, FirstStage] = {}
_MODEL_CACHE_SIZE = 2


def load_vqgan(spec: str | os.PathLike, *, config: str | os.PathLike | None = None,
               cache_dir: str | None = None) -> FirstStage:
    """Load a VQGAN (name, folder or checkpoint; see :func:`resolve_vqgan`); cached per file."""
    cfg_path, weights = resolve_vqgan(spec, config=config, cache_dir=cache_dir)
    stat = weights.stat()
    key = (str(cfg_path.resolve()), str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MODEL_CACHE:
        model = build_first_stage(TamingConfig.from_yaml(cfg_path), load_state_dict(weights))
        if len(_MODEL_CACHE) >= _MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key]


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
        raise ValueError(f"{label} {value} does not suit this VQGAN: it must be a multiple of {factor} "
                         f"(its downsampling factor); use {' or '.join(map(str, options))}")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimiser by case-insensitive name."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from Adam, AdamW, Adagrad, Adamax, RAdam, RMSprop, SGD")
    if not lr > 0:
        raise ValueError(f"learning rate is {lr}; it must be positive (e.g. --lr 0.1)")
    return OPTIMIZERS[key](params, lr=lr)


def make_lr_schedule(name: str, optimizer: torch.optim.Optimizer, steps: int):
    """``None`` for a constant rate, else a ``torch.optim.lr_scheduler`` over *steps* steps."""
    from torch.optim import lr_scheduler

    key = str(name).lower()
    steps = max(1, steps)
    if key == "constant":
        return None
    if key == "cosine":
        base = optimizer.param_groups[0]["lr"]
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.1 * base)
    if key == "step":
        return lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 3), gamma=0.5)
    if key == "linear":
        return lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=steps)
    raise ValueError(f"unknown lr_schedule {name!r}; choose from {', '.join(LR_SCHEDULES)}")


class _StraightThroughClamp(torch.autograd.Function):
    """Clamp in the forward pass; in the backward pass let the gradient through except where it
    would push a clamped value further out of range (the ``ClampWithGrad`` of VQGAN+CLIP)."""

    @staticmethod
    def forward(ctx, x, low, high):
        ctx.low, ctx.high = low, high
        ctx.save_for_backward(x)
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        outside = x - x.clamp(ctx.low, ctx.high)
        # Gradient descent moves x by -grad: keep grad unless that move goes further outside.
        return grad * (grad * outside >= 0), None, None


def clamp_with_grad(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Differentiable clamp: values clamped, gradients kept unless they push further out of range."""
    return _StraightThroughClamp.apply(x, low, high)


def straight_through_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code vectors in the forward pass, identity gradient to ``z`` (van den Oord et al.
    2017, VQ-VAE's straight-through estimator). ``z`` is ``[B, D, H, W]``, codebook ``[N, D]``."""
    from .taming_checkpoint import nearest_code

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
    from PIL import Image

    from guidance.prompts import check_image_file

    try:
        check_image_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"init image {str(path)!r} does not exist; check the path") from None
    except ValueError:
        raise ValueError(f"init image {str(path)!r} is not a readable image; use a PNG/JPEG/WebP file") from None
    with Image.open(path) as im:
        im = im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float().div(255).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------

class VQGANGenerator(Generator):
    """VQGAN+CLIP: Adam (or any torch optimiser) on a straight-through-quantised VQGAN latent."""

    name = "vqgan"
    Settings = VQGANSettings

    def __init__(self, settings: VQGANSettings | None = None, *, device=None, precision=None,
                 model: FirstStage | None = None):
        super().__init__(settings, device=device, precision=precision)
        s = self.settings
        self._validate(s)
        if model is None:
            cfg_path, weights = resolve_vqgan(s.vqgan, config=s.vqgan_config)
            check_size(s.width, s.height, TamingConfig.from_yaml(cfg_path).downsample)  # before the heavy load
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

    @staticmethod
    def _validate(s: VQGANSettings) -> None:
        if s.iterations < 0:
            raise ValueError(f"iterations is {s.iterations}; it must be 0 or more")
        if s.num_images < 1:
            raise ValueError(f"num_images is {s.num_images}; it must be at least 1")
        make_optimizer(s.optimizer, [torch.zeros(1, requires_grad=True)], s.learning_rate)
        if str(s.lr_schedule).lower() not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {s.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
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
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

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
        """Differentiable: quantise ``z`` (straight-through), decode, map to ``[0,1]``."""
        z_q = straight_through_quantize(z, self.codebook)
        if self.settings.channels_last:
            z_q = z_q.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            x = self.model.decode(z_q)
        return clamp_with_grad(x.float().add(1).div(2), 0.0, 1.0)

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
    def generate(self, clip_loss, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        s = self.settings
        generator = torch.Generator().manual_seed(int(seed))  # all randomness of this run
        z = self.initial_latents(generator).to(self.device, torch.float32)
        z_init = z.clone() if s.init_weight else None
        z.requires_grad_(True)
        optimizer = make_optimizer(s.optimizer, [z], s.learning_rate)
        schedule = make_lr_schedule(s.lr_schedule, optimizer, s.iterations)
        losses: list[torch.Tensor] = []
        interrupted, stopped_at = False, None

        def decode_now() -> torch.Tensor:
            return self.decode(z)

        try:
            for step in range(s.iterations):
                optimizer.zero_grad(set_to_none=True)
                images = self.render(z)
                parts: dict[str, torch.Tensor] = {}
                per_image = images.new_zeros(images.shape[0])
                if clip_loss is not None:
                    out = clip_loss(images, step=step, generator=generator)
                    per_image = per_image + out.per_image
                    parts.update(out.parts)
                if z_init is not None:
                    pull = (z - z_init).pow(2).mean((1, 2, 3)) * self._init_weight(step)
                    per_image = per_image + pull
                    parts["init"] = pull.detach()
                total = per_image.sum()
                if total.requires_grad:
                    total.backward()
                    optimizer.step()
                if schedule is not None:
                    schedule.step()
                with torch.no_grad():
                    z.copy_(torch.maximum(torch.minimum(z, self.z_max), self.z_min))
                loss = total.detach()
                losses.append(loss)
                if callback is not None:
                    keep_going = callback(StepInfo(step=step, total=s.iterations, latents=z.detach(),
                                                   decode=decode_now, loss=loss, parts=parts))
                    if keep_going is False:
                        stopped_at = step
                        break
        except KeyboardInterrupt:
            interrupted = True
        images = self.decode(z)
        history = torch.stack(losses).float().cpu().tolist() if losses else []
        info = {"steps_done": len(losses), "latent_shape": list(z.shape), "downsample": self.model.downsample,
                "codebook_size": int(self.codebook.shape[0]), "gumbel": bool(self.model.gumbel)}
        if stopped_at is not None:
            info["stopped_at"] = stopped_at
        return GenerationResult(images=images, losses=history, info=info, interrupted=interrupted)


__all__ = ["VQGANGenerator", "VQGANSettings", "KNOWN_MODELS", "MODEL_ALIASES", "OPTIMIZERS", "LR_SCHEDULES",
           "resolve_vqgan", "load_vqgan", "check_size", "make_optimizer", "make_lr_schedule", "clamp_with_grad",
           "straight_through_quantize", "noise_images"]
