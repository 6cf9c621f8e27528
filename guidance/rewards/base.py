"""The shared part of every reward model: the :class:`Reward` objective, tensor preprocessing, safe loading.

A reward scores images ``[B, 3, H, W]`` in ``[0, 1]`` against a caption, **higher is better**
(:meth:`Reward.score`, differentiable in the images). As an objective its loss is the plain
negative score, ``loss = -score`` per image; an ensemble weight ``w`` (``--reward NAME=W``)
multiplies that, so a run minimises ``clip_loss - sum_k w_k * score_k``. No normalisation is
applied: each reward keeps its own scale, which is why the default weights differ (see
``guidance.rewards.DEFAULT_WEIGHTS``).

Two preprocessing paths, on purpose:

- **steering** (:meth:`Reward.score`): the reward's resize / centre crop / normalisation done
  on tensors (antialiased bicubic), so gradients reach the pixels;
- **judging** (:meth:`Reward.score_reference`): the reference implementation's own preprocessing on
  8-bit PIL images (its processor or torchvision transform), so metric figures equal the
  reference code's.

Weights are never unpickled: ``.safetensors`` files, or ``torch.load(weights_only=True)`` for
plain state dicts (``.pt`` / ``.pth`` / ``.bin``); anything else is refused with one line.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import OPENAI_MEAN, OPENAI_STD
from ..errors import first_line, looks_like_path
from ..objective import LossOutput, Objective, check_image_values, check_images
from ..losses import clamp_with_grad


class ScoreHead(nn.Module):
    """The scoring MLP that ImageReward and the LAION aesthetic predictor both release:
    D -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between and no activations (inactive in eval)."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)

INSTALL_HINT = "pip install clipsteer[rewards]"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class RewardLoadError(OSError):
    """A reward model could not be loaded (one-line message)."""


def require(module: str, package: str, reward: str):
    """Import *module* or raise a one-line ``ImportError`` naming the missing optional *package*."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the {reward} reward needs the {package} package, which is not installed: "
                          f"{INSTALL_HINT} (or pip install {package})") from None


# ---------------------------------------------------------------------------------------------
# Loading weights safely
# ---------------------------------------------------------------------------------------------

def load_state_dict(path: str | Path, *, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a plain state dict through ``torch.load(weights_only=True)``.

    A checkpoint that wraps its tensors as ``{"state_dict": {...}}`` (HPS, Lightning) is unwrapped.
    A pickle that needs anything beyond tensors and plain containers is refused, never run.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any parse error is one line
            raise RewardLoadError(f"{what} checkpoint {str(path)!r} is not a readable safetensors file "
                                  f"({first_line(err, 100)})") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError and friends
        raise RewardLoadError(f"{what} checkpoint {str(path)!r} is not a plain state dict (refused to unpickle "
                              f"it: {first_line(err, 90)}); convert it to safetensors") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise RewardLoadError(f"{what} checkpoint {str(path)!r} holds no state dict of tensors")
    return {str(k): v for k, v in data.items()}


def hub_file(repo: str, filename: str, *, what: str) -> Path:
    """A file of a Hub repository (from the local Hub cache when offline), with a one-line error."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as err:  # noqa: BLE001 - offline, missing repo, gated...
        raise RewardLoadError(f"could not load {what} weights {repo}/{filename}: {first_line(err, 110)}. If you "
                              f"are offline, download them first (`hf download {repo} {filename}`) and pass the "
                              "local file or folder") from None


def find_weights(folder: Path, names: Sequence[str], *, what: str) -> Path:
    """The first of *names* (then any single weights file) in *folder*."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{what} folder {str(folder)!r} has no weights file ({', '.join(names)}); "
                            "give the checkpoint file itself")


def check_local(spec: str, *, what: str) -> Path | None:
    """The path *spec* names, if it is one (it must then exist); ``None`` for a Hub id."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if looks_like_path(spec, WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"{what} checkpoint {spec!r} does not exist; check the path")
    return None


# ---------------------------------------------------------------------------------------------
# Differentiable preprocessing
# ---------------------------------------------------------------------------------------------

def resize_crop(images: torch.Tensor, size: int, *, mode: str = "bicubic") -> torch.Tensor:
    """Shortest side to *size* (antialiased), then a centre crop to ``size x size``: the tensor form of
    CLIP-style processors (``Resize(size)`` + ``CenterCrop(size)``)."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = (size, max(size, round(w * scale))) if h <= w else (max(size, round(h * scale)), size)
        images = F.interpolate(images, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        images = images[..., top:top + size, left:left + size]
    return images


class SharedResize:
    """Clamped resizes shared by the rewards of one objective: the same image batch clamped to ``[0, 1]``
    (gradient passing through, ``clamp_with_grad``) and resized to the same size is computed once per step (PickScore, HPS, ImageReward and the aesthetic CLIP all take 224²).
    Holds only the latest batch (weakly), so no graph outlives its step."""

    def __init__(self):
        self._ref: weakref.ref | None = None
        self._version = -1
        self._out: dict[tuple, torch.Tensor] = {}
        self.hits = 0

    def __call__(self, images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
        if self._ref is None or self._ref() is not images or self._version != images._version:
            self._ref, self._version, self._out = weakref.ref(images), images._version, {}
        key = (size, mode)
        if key in self._out:
            self.hits += 1
        else:
            self._out[key] = resize_crop(clamp_with_grad(images), size, mode=mode)
        return self._out[key]


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------

class Reward(Objective):
    """A frozen reward model as an objective: ``score`` (higher is better), loss ``-score``.

    Subclasses set ``name``, ``input_size``, ``mean`` / ``std`` and implement
    :meth:`image_features` (normalised pixels -> features, differentiable), :meth:`text_features`
    (captions -> features, no grad; cached per caption) and :meth:`combine` (features -> ``[B]``
    scores), plus :meth:`reference_pixels` for metric mode. ``uses_text = False`` for rewards that
    ignore the caption (the aesthetic predictor).

    Args:
        prompts: the captions the reward scores against while steering (a prompt string or a
            :class:`~guidance.prompts.PromptSchedule`); its positive text prompts at each step,
            joined with ", ", are the caption.
        gradient_checkpointing: recompute the image tower in the backward pass instead of
            keeping its activations (less memory for the large towers, one more forward).
        resize: a :class:`SharedResize` shared with the other rewards of the run.
    """

    name = "reward"
    uses_text = True
    raw_parts = ("score",)          # logged unweighted by WeightedObjectives
    input_size = 224
    mean: Sequence[float] = OPENAI_MEAN
    std: Sequence[float] = OPENAI_STD
    resize_mode = "bicubic"

    def __init__(self, *, prompts=None, model_name: str = "", gradient_checkpointing: bool = False,
                 resize: SharedResize | None = None):
        super().__init__()
        self.model_name = model_name
        self.objective_name = self.name
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.resize = resize if resize is not None else SharedResize()
        self.register_buffer("_mean", torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._values_checked = False
        self.schedule = None
        if prompts is not None:
            self.set_prompts(prompts)

    # -- frozen, eval ------------------------------------------------------------------------
    def freeze(self) -> "Reward":
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Reward":  # a reward never trains: dropout stays off
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def _first_tensor(self):
        for p in self.parameters():
            return p
        return self._mean

    # -- prompts -----------------------------------------------------------------------------
    def set_prompts(self, prompts) -> None:
        from ..prompts import PromptSchedule

        self.schedule = prompts if isinstance(prompts, PromptSchedule) else PromptSchedule(prompts)

    def conditioning_text(self, step: int = 0) -> str:
        return self.schedule.positive_text(step) if self.schedule is not None else ""

    # -- subclass hooks ----------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def text_features(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def combine(self, image_feats: torch.Tensor, text_feats: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def reference_pixels(self, pil_images: list) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- scoring -----------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in ``[0,1]`` (overshoot clamped) -> the model's normalised input, differentiably."""
        pixels = self.resize(images, self.input_size, self.resize_mode)
        pixels = (pixels - self._mean.to(pixels.dtype)) / self._std.to(pixels.dtype)
        return pixels.to(self.dtype)

    def _texts(self, prompts, n: int) -> list[str] | None:
        if not self.uses_text:
            return None
        if prompts is None:
            raise ValueError(f"the {self.name} reward scores images against a caption; give prompts")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{self.name}: captions must be non-empty strings")
        if len(texts) == 1 and n > 1:
            texts = texts * n
        if len(texts) != n:
            raise ValueError(f"{self.name}: got {n} images but {len(texts)} captions; give one caption or one per image")
        return texts

    def _cached_text(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if new:
            with torch.no_grad():
                feats = self.text_features(new)
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            self._text_cache.update(zip(new, feats))
        return torch.stack([self._text_cache[t] for t in texts])

    def _image_pass(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and pixels.requires_grad and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.image_features, pixels, use_reentrant=False)
        return self.image_features(pixels)

    def score_pixels(self, pixels: torch.Tensor, prompts=None) -> torch.Tensor:
        """Scores ``[B]`` (float32) from already preprocessed pixels."""
        texts = self._texts(prompts, pixels.shape[0])
        text_feats = self._cached_text(texts) if texts is not None else None
        return self.combine(self._image_pass(pixels.to(self.device, self.dtype)), text_feats).float()

    def score(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        """Differentiable scores ``[B]`` (float32, higher is better) of images in ``[0, 1]`` against
        *prompts* (one caption for all, or one per image; ignored by rewards without text)."""
        check_images(images)
        return self.score_pixels(self.preprocess(images), prompts)

    def forward(self, images: torch.Tensor, *, step: int = 0, generator: torch.Generator | None = None) -> LossOutput:
        check_images(images)
        if not self._values_checked:
            check_image_values(images.detach(), strict=False)
            self._values_checked = True
        caption = self.conditioning_text(step) if self.uses_text else None
        if self.uses_text and not caption:
            raise ValueError(f"the {self.name} reward needs a positive text prompt to score against")
        scores = self.score(images, caption)
        return LossOutput(total=-scores.sum(), per_image=-scores, parts={"score": scores.detach()})

    @torch.inference_mode()
    def score_reference(self, images, prompts=None) -> torch.Tensor:
        """Metric mode: scores ``[N]`` (float64, CPU) with the reference preprocessing on 8-bit PIL images.

        *images*: paths, PIL images, uint8 tensors or float tensors in ``[0, 1]`` (rounded to 8 bits,
        as saving them would)."""
        from PIL import Image

        from ..score import _quantize, as_image_list

        tensors = as_image_list(images)
        pils = [Image.fromarray(_quantize(t).permute(1, 2, 0).numpy()) for t in tensors]
        pixels = self.reference_pixels(pils)
        return self.score_pixels(pixels, prompts).double().cpu()

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}"


def set_precision(module: torch.nn.Module, device, precision) -> tuple[torch.device, torch.dtype]:
    """Move *module* to the device and dtype a run asked for (fp32 on the CPU unless bf16 is asked)."""
    from ..runtime import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    module.to(device=dev, dtype=dtype)
    return dev, dtype


__all__ = ["Reward", "SharedResize", "RewardLoadError", "resize_crop", "load_state_dict", "hub_file", "find_weights",
           "check_local", "require", "set_precision", "INSTALL_HINT"]
