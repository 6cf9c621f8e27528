"""One small interface over CLIP implementations.

An encoder takes images as float tensors ``[B, 3, H, W]`` in ``[0, 1]`` and text as
strings, and returns (unnormalised) embeddings. Resizing to the model's input size and
its own mean/std normalisation happen here and nowhere else.

- :class:`HFCLIPEncoder` wraps a transformers ``CLIPModel`` (Hub id or local folder).
- :class:`OpenCLIPEncoder` wraps an ``open_clip`` model (``"open_clip:ARCH/PRETRAINED"``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import load_error, looks_like_path, readable_weights
from .patch_embedding import use_matmul_patch_embedding
from .runtime import autocast, resolve_device, resolve_dtype

#: OpenAI's CLIP ViT-L/14: the default judge (CLIP score), and the backbone of PickScore and the aesthetic head
CLIP_VIT_L14 = "openai/clip-vit-large-patch14"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Encoder(nn.Module):
    """Base class: frozen CLIP image and text towers behind ``encode_image`` / ``encode_text``."""

    name: str
    input_size: int
    embed_dim: int
    context_length: int

    def __init__(self, name: str, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _freeze(self) -> None:
        self.eval()
        self.requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in ``[0,1]`` -> the model's normalised input (antialiased resize)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size),
                                   mode="bicubic", align_corners=False, antialias=True)
        images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return images.to(self.dtype)

    @property
    def image_tower(self) -> nn.Module:
        """The image tower ``--compile`` compiles."""
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable image embeddings ``[B, D]`` (float32) for images in ``[0,1]``; a half-precision
        encoder runs under autocast (on CUDA, normalisations and softmax in float32)."""
        with autocast(self.device, self.dtype):
            return self._image_features(self.preprocess(images)).float()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``[N, D]`` (float32). Over-long texts are truncated with a warning."""
        if isinstance(texts, str):
            texts = [texts]
        return self._text_features(list(texts)).float()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _warn_truncated(self, texts: Sequence[str], lengths: Sequence[int]) -> None:
        """One warning per long prompt, whichever and however many CLIPs read it: the message names neither
        the CLIP nor the whole prompt, and is issued from one place, so Python's warning filter says it once."""
        for text, n in zip(texts, lengths):
            if n > self.context_length:
                shown = text if len(text) <= 60 else text[:57] + "..."
                warnings.warn(f"prompt {shown!r} is {n} tokens, longer than CLIP's {self.context_length}-token "
                              "context; it is truncated", stacklevel=1)


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object from ``get_*_features``; 4.x a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class HFCLIPEncoder(Encoder):
    """A transformers ``CLIPModel`` with its tokenizer and image mean/std."""

    def __init__(self, model, tokenizer, *, name: str, mean=OPENAI_MEAN, std=OPENAI_STD):
        super().__init__(name, mean, std)
        self.model = model
        self.tokenizer = tokenizer
        self.input_size = int(model.config.vision_config.image_size)
        self.embed_dim = int(model.config.projection_dim)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        use_matmul_patch_embedding(model.vision_model.embeddings, "patch_embedding")
        self._freeze()

    @property
    def image_tower(self) -> nn.Module:
        return self.model.vision_model

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return features(self.model.get_image_features(pixel_values=pixels))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        full = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]   # we warn, once
        self._warn_truncated(texts, [len(ids) for ids in full])
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return features(self.model.get_text_features(**self.tokenize(texts)))

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device=None, dtype=None) -> "HFCLIPEncoder":
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        _check_local(name_or_path)
        dtype = dtype or torch.float32
        try:
            model = CLIPModel.from_pretrained(name_or_path, dtype=dtype, **_attention(device, dtype))
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as err:
            raise _load_error(name_or_path, err) from None
        try:
            proc = CLIPImageProcessor.from_pretrained(name_or_path)
            mean, std = proc.image_mean, proc.image_std
        except OSError:
            mean, std = OPENAI_MEAN, OPENAI_STD
        enc = cls(model, tokenizer, name=name_or_path, mean=mean, std=std)
        return enc.to(device) if device is not None else enc


class OpenCLIPEncoder(Encoder):
    """An ``open_clip`` model, named ``"open_clip:ARCH/PRETRAINED"`` (or ``"open_clip:ARCH"``)."""

    def __init__(self, model, tokenizer, *, name: str, mean=OPENAI_MEAN, std=OPENAI_STD):
        super().__init__(name, mean, std)
        self.model = model
        self.tokenizer = tokenizer
        size = model.visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") \
            else int(model.visual.output_dim)
        self.context_length = int(getattr(model, "context_length", 77))
        use_matmul_patch_embedding(model.visual, "conv1")
        self._freeze()

    @property
    def image_tower(self) -> nn.Module:
        return self.model.visual

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        inner = getattr(self.tokenizer, "tokenizer", None) or self.tokenizer
        encode = getattr(inner, "encode", None)
        if encode is not None:
            self._warn_truncated(texts, [len(encode(t)) + 2 for t in texts])
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)

    @classmethod
    def from_spec(cls, spec: str, *, device=None, dtype=None) -> "OpenCLIPEncoder":
        try:
            import open_clip
        except ImportError:
            raise ImportError(f"{spec!r} needs the open_clip_torch package: pip install open_clip_torch") from None
        arch, pretrained = parse_open_clip_spec(spec)
        if pretrained and looks_like_path(pretrained) and not Path(pretrained).expanduser().is_file():
            raise FileNotFoundError(f"open_clip checkpoint {pretrained!r} (from {spec!r}) does not exist; check the path")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        except (RuntimeError, ValueError, OSError, KeyError) as err:
            raise _load_error(spec, err) from None
        mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_STD
        enc = cls(model.to(dtype or torch.float32), open_clip.get_tokenizer(arch), name=spec, mean=mean, std=std)
        return enc.to(device) if device is not None else enc


def parse_open_clip_spec(spec: str) -> tuple[str, str | None]:
    """``open_clip:...`` -> (model name for open_clip, pretrained tag or checkpoint file, or None):

    - ``open_clip:ARCH`` (random weights) or ``open_clip:ARCH/TAG`` (``ViT-B-32/laion2b_s34b_b79k``);
    - ``open_clip:ARCH/PATH`` with a local checkpoint file (``open_clip:ViT-B-32//models/clip.pt``);
    - ``open_clip:hf-hub:ORG/REPO`` and ``open_clip:local-dir:FOLDER`` (open_clip's own schemas).
    """
    rest = spec.split(":", 1)[1] if spec.startswith("open_clip:") else spec
    if not rest.strip():
        raise ValueError(f"{spec!r} names no model; write open_clip:ARCH/PRETRAINED, e.g. "
                         "open_clip:ViT-B-32/laion2b_s34b_b79k")
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    arch, _, pretrained = rest.partition("/")
    return arch, (pretrained or None)


def _attention(device, dtype: torch.dtype) -> dict:
    """transformers' attention for a CLIP in *dtype* on *device*: eager (two matrix products and a float32
    softmax) for half precision on the CPU, where torch's fused attention backward is much slower than eager
    in bf16 (docs/benchmarks.md, "Measurements behind code choices"); transformers' default (SDPA) elsewhere."""
    cpu = torch.device(device).type == "cpu" if device is not None else True
    return {"attn_implementation": "eager"} if cpu and dtype != torch.float32 else {}


def _check_local(name: str) -> None:
    """A name that is clearly a path (not an ``org/model`` Hub id) must exist."""
    if Path(name).expanduser().exists():
        return
    if looks_like_path(name):
        raise FileNotFoundError(f"CLIP model folder {name!r} does not exist; give a Hub id such as "
                                "'openai/clip-vit-base-patch32' or an existing local folder")


def _load_error(name: str, err: Exception) -> OSError:
    return load_error("CLIP model", name, err)


def load_encoder(spec: str, *, device=None, precision=None) -> Encoder:
    """Load one CLIP encoder by Hub id, local folder, or ``"open_clip:ARCH/PRETRAINED"``."""
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    with readable_weights("CLIP", spec):
        if spec.startswith("open_clip:"):
            return OpenCLIPEncoder.from_spec(spec, device=dev, dtype=dtype)
        return HFCLIPEncoder.from_pretrained(spec, device=dev, dtype=dtype)


def parse_encoder_spec(spec: str) -> tuple[str, float]:
    """``"name"`` or ``"name=WEIGHT"`` -> (name, weight), for ensembles of encoders."""
    name, sep, weight = spec.rpartition("=")
    if sep:
        try:
            return name, float(weight)
        except ValueError:
            pass
    return spec, 1.0
