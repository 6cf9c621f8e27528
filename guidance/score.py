"""CLIP score: how well images match captions (or reference images), as other tools report it.

Three definitions, named so every number says which one it is (``cos`` is the cosine
similarity of the L2-normalised CLIP image and text embeddings of one image-caption pair):

``"torchmetrics"`` (default)
    What torchmetrics 1.9 ``CLIPScore`` / ``clip_score`` actually compute: each pair scores
    ``100·cos`` (unclamped, may be negative) and the mean is ``max(mean over pairs of 100·cos, 0)``.
    Its docstring says ``max(100·cos, 0)`` per pair, but the code clamps only the mean.
``"per_pair"``
    The per-pair form that docstring describes: each pair scores ``100·max(cos, 0)``; the mean is
    the plain mean of those. Differs from ``"torchmetrics"`` only when some pair has ``cos < 0``.
``"hessel"``
    The original CLIPScore of Hessel et al. 2021 (arXiv:2104.08718): ``2.5·max(cos, 0)`` per pair,
    plain mean. Their reference code prefixes each caption with ``"A photo depicts "``; pass
    ``prefix=HESSEL_PREFIX`` to do the same (off by default, as in torchmetrics).

``reduction="none"`` returns the per-pair numbers above; ``reduction="mean"`` the mean above
(so for ``"torchmetrics"``, ``max(per_pair.mean(), 0)``).

Images are preprocessed by the model's own image processor (the same one torchmetrics uses),
so numbers agree with torchmetrics. 8-bit inputs (files, PIL images, uint8 tensors) go through it
unchanged. Float tensors in ``[0, 1]`` are rounded to 8 bits first by default (``quantize=True``),
so a tensor scores exactly like the PNG saved from it; ``quantize=False`` resizes in float instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .encoders import CLIP_VIT_L14, Encoder, HFCLIPEncoder, features as _pooled, load_encoder
from .images import pil_to_tensor, read_image
from .runtime import resolve_device

DEFAULT_MODEL = CLIP_VIT_L14
DEFINITIONS = ("torchmetrics", "per_pair", "hessel")
HESSEL_PREFIX = "A photo depicts "
HESSEL_WEIGHT = 2.5
_REDUCTIONS = ("mean", "none")
#: ``"torchvision"``: batched tensor resize (transformers 5 / torchmetrics 1.9 default, 8-bit inputs resized
#: in 8 bits); ``"pil"``: PIL resize as in transformers 4 and OpenAI CLIP. They differ by at most one 8-bit
#: level per pixel after resizing, which moves scores by ~1e-3 (measured on a tiny random CLIP).
IMAGE_BACKENDS = ("torchvision", "pil")
_TEXT_CACHE_SIZE = 8192


# ---------------------------------------------------------------------------------------------
# Image inputs
# ---------------------------------------------------------------------------------------------

def _check_tensor(t: torch.Tensor, what: str) -> list[torch.Tensor]:
    """A ``[3,H,W]`` or ``[B,3,H,W]`` tensor -> list of ``[3,H,W]`` uint8 or float32 tensors."""
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] != 3:
        hint = " (channels-last? use .permute(0, 3, 1, 2))" if t.dim() == 4 and t.shape[-1] == 3 else ""
        raise ValueError(f"{what} must be [B, 3, H, W] or [3, H, W] RGB; got shape {tuple(t.shape)}{hint}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(t.shape)})")
    t = t.detach()
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{what} has dtype {t.dtype}; pass uint8 (0-255) or float in [0, 1]")
    if not t.is_floating_point():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{what} is an integer tensor with values in [{lo}, {hi}]; 8-bit images must be "
                             "in [0, 255] (or pass floats in [0, 1])")
        t = t.to(torch.uint8)
    else:
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError(f"{what} contains NaN or infinite values; fix the images before scoring")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            if lo >= 0.0 and hi <= 255.0:
                raise ValueError(f"{what} is a float tensor with values up to {hi:g}: it looks like the 8-bit "
                                 "range (0-255) passed as float; divide by 255 or pass images.to(torch.uint8)")
            raise ValueError(f"{what} is a float tensor with values in [{lo:g}, {hi:g}]; float images must be in "
                             "[0, 1] (for [-1, 1] images use (x + 1) / 2, or clamp(0, 1))")
    return list(t.cpu().unbind(0))


def as_image_list(images, what: str = "images") -> list[torch.Tensor]:
    """Paths, PIL images, uint8 tensors or float tensors in [0,1] (or a list of them) ->
    a list of ``[3,H,W]`` uint8 / float32 CPU tensors; a clear ``ValueError`` for anything else."""
    if isinstance(images, (str, Path, torch.Tensor)) or _is_pil(images):
        images = [images]
    try:
        items = list(images)
    except TypeError:
        raise ValueError(f"{what} must be a tensor, a path, a PIL image or a list of them; "
                         f"got {type(images).__name__}") from None
    if not items:
        raise ValueError(f"{what} is empty; pass at least one image")
    out: list[torch.Tensor] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            out.append(read_image(item))
        elif _is_pil(item):
            out.append(pil_to_tensor(item))
        elif isinstance(item, torch.Tensor):
            out.extend(_check_tensor(item, what if len(items) == 1 else f"{what}[{i}]"))
        else:
            raise ValueError(f"{what}[{i}] is a {type(item).__name__}; pass a path, a PIL image, a uint8 tensor "
                             "or a float tensor in [0, 1]")
    return out


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def _quantize(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint8:
        return img
    return img.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The scoring model
# ---------------------------------------------------------------------------------------------

class ScoreModel:
    """A CLIP :class:`~guidance.encoders.Encoder` plus the model's own image processor,
    loaded once and reused for CLIP scores (torchmetrics-compatible preprocessing)."""

    def __init__(self, encoder: Encoder, processor=None, *, name: str | None = None):
        if not isinstance(encoder, Encoder):
            raise ValueError(f"ScoreModel needs a guidance Encoder; got {type(encoder).__name__}")
        self.encoder = encoder
        self.processor = processor if processor is not None else _default_processor(encoder)
        self.name = name or encoder.name
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, name: str, *, device=None, precision=None, image_backend: str = "torchvision") -> "ScoreModel":
        """Load a CLIP model (Hub id, local folder or ``"open_clip:ARCH/PRETRAINED"``) and its processor.

        ``image_backend="torchvision"`` (default) is the batched tensor processor transformers 5 and
        torchmetrics use; ``"pil"`` is the PIL processor (transformers 4's default; ~1 level of 8-bit
        rounding apart, see ``IMAGE_BACKENDS``)."""
        if image_backend not in IMAGE_BACKENDS:
            raise ValueError(f"unknown image_backend {image_backend!r}; use one of {', '.join(IMAGE_BACKENDS)}")
        encoder = load_encoder(name, device=device, precision=precision)
        processor = None
        if isinstance(encoder, HFCLIPEncoder):
            from transformers import AutoImageProcessor

            try:
                processor = AutoImageProcessor.from_pretrained(name, backend=image_backend)
            except (OSError, ValueError):
                processor = None  # no preprocessor_config.json: CLIP defaults from the encoder
        if processor is None:
            processor = _default_processor(encoder, image_backend)
        return cls(encoder, processor, name=name)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def image_backend(self) -> str:
        return "pil" if getattr(self.processor, "backend", None) == "pil" else "torchvision"

    def preprocess(self, images: Sequence[torch.Tensor], *, quantize: bool = True) -> torch.Tensor:
        """``[3,H,W]`` uint8 / float-in-[0,1] tensors -> normalised ``pixel_values`` via the processor."""
        if self.image_backend == "pil":  # PIL works in 8 bits
            from PIL import Image

            ims = [Image.fromarray(_quantize(im).permute(1, 2, 0).numpy()) for im in images]
            return self.processor(images=ims, return_tensors="pt")["pixel_values"]
        if quantize:
            images = [_quantize(im) for im in images]
        kinds = [im.dtype == torch.uint8 for im in images]
        out: list[torch.Tensor | None] = [None] * len(images)
        for is_uint8 in (True, False):
            idx = [i for i, k in enumerate(kinds) if k == is_uint8]
            if not idx:
                continue
            group = [images[i] for i in idx]
            kw = {} if is_uint8 else {"do_rescale": False}
            pixels = self.processor(images=group, return_tensors="pt", **kw)["pixel_values"]
            for j, i in enumerate(idx):
                out[i] = pixels[j]
        return torch.stack(out)  # type: ignore[arg-type]

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32) from processed ``pixel_values``."""
        enc = self.encoder
        feats = enc._image_features(pixels.to(enc.device, enc.dtype)).float()
        return feats / feats.norm(p=2, dim=-1, keepdim=True)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]`` (float32); each unique text is encoded once and
        cached; over-long texts warn (naming the prompt) and are truncated keeping the end token."""
        texts = list(texts)
        found = {t: self._text_cache[t] for t in dict.fromkeys(texts) if t in self._text_cache}
        new = [t for t in dict.fromkeys(texts) if t not in found]
        for start in range(0, len(new), 256):
            chunk = new[start:start + 256]
            feats = self.encoder.encode_text(chunk).float()
            found.update(zip(chunk, feats / feats.norm(p=2, dim=-1, keepdim=True)))
        if new:
            if len(self._text_cache) + len(new) > _TEXT_CACHE_SIZE:
                self._text_cache.clear()
            self._text_cache.update((t, found[t]) for t in new[:_TEXT_CACHE_SIZE])
        return torch.stack([found[t] for t in texts])

    def clear_cache(self) -> None:
        """Forget cached text embeddings (call after changing the model's weights)."""
        self._text_cache.clear()

    @torch.inference_mode()
    def cosine(self, images: Sequence[torch.Tensor], texts: Sequence[str] | None = None, *,
               references: Sequence[torch.Tensor] | None = None, quantize: bool = True) -> torch.Tensor:
        """Cosine similarity ``[N]`` (float64, CPU) of each image with its text (or reference image),
        in one batch; images are ``[3,H,W]`` uint8 or float-in-[0,1] tensors (see :func:`as_image_list`)."""
        img = self.image_features(self.preprocess(images, quantize=quantize))
        if texts is not None:
            tgt = self.text_features(texts).to(img.device)
        else:
            tgt = self.image_features(self.preprocess(references, quantize=quantize))
        return (img * tgt).sum(-1).double().cpu()

    def __repr__(self) -> str:
        return f"ScoreModel({self.name!r}, device={self.device})"


def _default_processor(encoder: Encoder, image_backend: str = "torchvision"):
    """CLIP's standard preprocessing (bicubic shortest-edge resize, centre crop, mean/std)."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    size = int(encoder.input_size)
    cls = CLIPImageProcessorPil if image_backend == "pil" else CLIPImageProcessor
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=encoder.mean.flatten().tolist(), image_std=encoder.std.flatten().tolist())


def get_score_model(model, *, device=None, precision=None) -> ScoreModel:
    """A :class:`ScoreModel` from a name (cached: loaded once per name/device/precision), an
    :class:`~guidance.encoders.Encoder`, or a ``ScoreModel`` (returned as is)."""
    if isinstance(model, ScoreModel):
        return model
    if isinstance(model, Encoder):
        return ScoreModel(model)
    if isinstance(model, Path):
        model = str(model)
    if not isinstance(model, str):
        raise ValueError(f"model must be a CLIP name or folder, a ScoreModel or an Encoder; got {type(model).__name__}")
    from .cache import cached

    key = (model, str(resolve_device(device)), str(precision or "fp32"))
    return cached("score", key, lambda: ScoreModel.load(model, device=device, precision=precision))


def _score_models(model, *, device=None, precision=None) -> tuple[list[ScoreModel], bool]:
    """(models, several?) from one model spec or a list/tuple of them."""
    if isinstance(model, (list, tuple)):
        if not model:
            raise ValueError("model list is empty; name at least one CLIP model")
        return [get_score_model(m, device=device, precision=precision) for m in model], True
    return [get_score_model(model, device=device, precision=precision)], False


# ---------------------------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------------------------

def _check_definition(definition: str) -> str:
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown CLIP-score definition {definition!r}; use one of {', '.join(DEFINITIONS)}")
    return definition


def pair_scores(cos: torch.Tensor, definition: str = "torchmetrics") -> torch.Tensor:
    """Per-pair CLIP scores from cosine similarities under *definition* (see the module docstring)."""
    _check_definition(definition)
    if definition == "torchmetrics":
        return 100.0 * cos
    if definition == "per_pair":
        return 100.0 * cos.clamp_min(0.0)
    return HESSEL_WEIGHT * cos.clamp_min(0.0)


def reduce_scores(total: torch.Tensor | float, count: int, definition: str = "torchmetrics") -> torch.Tensor:
    """The mean CLIP score from a sum of per-pair scores and a count (torchmetrics clamps the mean at 0)."""
    _check_definition(definition)
    if count <= 0:
        raise ValueError("no image-caption pairs were scored; nothing to average")
    mean = torch.as_tensor(total, dtype=torch.float64) / count
    if definition == "torchmetrics":
        mean = mean.clamp_min(0.0)
    return mean.float()


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def _as_prompts(prompts, n: int, prefix: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        raise ValueError(f"prompts must be a string or a list of strings; got {type(prompts).__name__}") from None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty string or list of strings")
    if any(not p.strip() for p in prompts):
        raise ValueError("a caption is empty; give the text each image should be scored against")
    if len(prompts) == 1 and n > 1:
        prompts = prompts * n
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; pass one prompt for all images "
                         "or exactly one per image")
    return [prefix + p for p in prompts]


def _cosines(sm: ScoreModel, images: list[torch.Tensor], *, prompts: list[str] | None,
             references: list[torch.Tensor] | None, batch_size: int, quantize: bool) -> torch.Tensor:
    """Cosine similarities ``[N]`` (float64, CPU) of each image with its caption or reference."""
    out = []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        out.append(sm.cosine(images[sl], prompts[sl] if prompts is not None else None,
                             references=references[sl] if references is not None else None, quantize=quantize))
    return torch.cat(out)


def _score(images, prompts, references, *, model, definition, reduction, prefix, batch_size, device,
           precision, quantize):
    _check_definition(definition)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'none'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if (prompts is None) == (references is None):
        raise ValueError("give either prompts (text) or references= (images) to compare the images with")
    imgs = as_image_list(images)
    caps = refs = None
    if prompts is not None:
        caps = _as_prompts(prompts, len(imgs), prefix)
    else:
        refs = as_image_list(references, "references")
        if len(refs) == 1 and len(imgs) > 1:
            refs = refs * len(imgs)
        if len(refs) != len(imgs):
            raise ValueError(f"got {len(imgs)} images but {len(refs)} reference images; pass one reference "
                             "for all or exactly one per image")
    models, several = _score_models(model, device=device, precision=precision)
    results = {}
    for sm in models:
        scores = pair_scores(_cosines(sm, imgs, prompts=caps, references=refs, batch_size=batch_size,
                                      quantize=quantize), definition)
        if reduction == "mean":
            results[sm.name] = reduce_scores(scores.sum(), len(scores), definition)
        else:
            results[sm.name] = scores.float()
    return results if several else next(iter(results.values()))


def clip_score(images, prompts: str | Sequence[str], *, model=DEFAULT_MODEL, definition: str = "torchmetrics",
               reduction: str = "mean", prefix: str = "", batch_size: int = 32, device=None, precision=None,
               quantize: bool = True):
    """CLIP score of images against captions (Radford et al. 2021 embeddings; definitions: torchmetrics
    1.9, per-pair, or Hessel et al. 2021), batched, each unique caption encoded once.

    Args:
        images: a ``[B,3,H,W]`` / ``[3,H,W]`` uint8 tensor or float tensor in ``[0,1]``, a path,
            a PIL image, or a list of those.
        prompts: one caption for all images, or one per image.
        model: a CLIP name or folder (loaded once and cached), a :class:`ScoreModel`, an
            :class:`Encoder`, or a list of them (then a ``{model name: result}`` dict is returned).
        definition: ``"torchmetrics"``, ``"per_pair"`` or ``"hessel"`` (module docstring).
        reduction: ``"mean"`` (a scalar) or ``"none"`` (one score per image, ``[B]``).
        prefix: prepended to every caption (``HESSEL_PREFIX`` reproduces Hessel et al.).
        quantize: round float images to 8 bits first, as saving them would.
        precision: ``"bf16"`` speeds up CUDA but changes numbers; default fp32.
    """
    return _score(images, prompts, None, model=model, definition=definition, reduction=reduction, prefix=prefix,
                  batch_size=batch_size, device=device, precision=precision, quantize=quantize)


def image_similarity(images, references, *, model=DEFAULT_MODEL, definition: str = "torchmetrics",
                     reduction: str = "mean", batch_size: int = 32, device=None, precision=None,
                     quantize: bool = True):
    """Image-image CLIP score (torchmetrics' ``CLIPScore(images, images)``: ``100·cos`` of CLIP image
    embeddings, under the same *definition* and *reduction* rules as :func:`clip_score`); one
    reference for all images or one per image."""
    return _score(images, None, references, model=model, definition=definition, reduction=reduction, prefix="",
                  batch_size=batch_size, device=device, precision=precision, quantize=quantize)


class CLIPScore:
    """Accumulating CLIP score over batches (torchmetrics-style ``update``/``compute``/``reset``
    over a score sum and a pair count), one model pass per batch, no autograd graph kept.

    ``metric(images, prompts)`` updates the state and returns the batch's mean score from the
    same pass (torchmetrics' ``forward`` runs CLIP twice for that). Several models: ``model=[a, b]``,
    and ``compute()`` returns ``{name: score}``.
    """

    def __init__(self, model=DEFAULT_MODEL, *, definition: str = "torchmetrics", prefix: str = "",
                 batch_size: int = 32, device=None, precision=None, quantize: bool = True):
        self.definition = _check_definition(definition)
        self.prefix = prefix
        self.batch_size = int(batch_size)
        self.quantize = quantize
        self.models, self._several = _score_models(model, device=device, precision=precision)
        self.reset()

    def reset(self) -> None:
        """Forget every pair seen so far."""
        self.score_sum = {sm.name: 0.0 for sm in self.models}
        self.count = 0

    def update(self, images, prompts: str | Sequence[str] | None = None, *, references=None):
        """Score a batch against captions (or ``references=`` images), add it to the state and
        return the per-pair scores ``[B]`` (a dict of them for several models)."""
        scores = _score(images, prompts, references, model=self.models if self._several else self.models[0],
                        definition=self.definition, reduction="none", prefix=self.prefix,
                        batch_size=self.batch_size, device=None, precision=None, quantize=self.quantize)
        per_model = scores if self._several else {self.models[0].name: scores}
        for name, s in per_model.items():
            self.score_sum[name] += float(s.double().sum())
        self.count += len(next(iter(per_model.values())))
        return scores

    def compute(self):
        """The mean score over every pair seen since the last ``reset`` (see ``definition``)."""
        out = {name: reduce_scores(total, self.count, self.definition) for name, total in self.score_sum.items()}
        return out if self._several else next(iter(out.values()))

    def __call__(self, images, prompts: str | Sequence[str] | None = None, *, references=None):
        """Update with the batch and return the batch's own mean score (one pass over CLIP)."""
        scores = self.update(images, prompts, references=references)
        if self._several:
            return {k: reduce_scores(v.double().sum(), len(v), self.definition) for k, v in scores.items()}
        return reduce_scores(scores.double().sum(), len(scores), self.definition)


class TorchmetricsCLIP(torch.nn.Module):
    """A transformers ``CLIPModel`` as torchmetrics 1.9's ``CLIPScore`` expects it on transformers 5.

    torchmetrics calls ``.norm`` on ``get_image_features`` / ``get_text_features``, which return an
    output object since transformers 5; this hands it the pooled tensor (what transformers 4
    returned), leaving torchmetrics' formula untouched. For comparisons::

        TMCLIPScore(model_name_or_path=lambda: (TorchmetricsCLIP(model), processor))
    """

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    def get_image_features(self, *args, **kwargs):
        return _pooled(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _pooled(self.clip.get_text_features(*args, **kwargs))
