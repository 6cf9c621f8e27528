"""CLIP-architecture rewards on a transformers ``CLIPModel``: ``clip`` and ``pickscore``.

- ``clip``: ``100 * cos(image, caption)``, the per-pair CLIP score (torchmetrics' number before
  its mean is clamped), from any CLIP folder or Hub id.
- ``pickscore``: PickScore v1 (Kirstain et al. 2023), a CLIP ViT-H/14 fine-tuned on Pick-a-Pic
  human preferences; ``logit_scale.exp() * cos(image, caption)`` as in the authors' example.
  Real weights ``yuvalkirstain/PickScore_v1`` with the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Any CLIP folder (e.g. a toy CLIP) can stand in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..encoders import CLIP_VIT_L14, features
from ..errors import first_line
from .base import Reward, RewardLoadError, check_local, set_precision


class CLIPReward(Reward):
    """``100 * cos`` of a transformers CLIP's image and text embeddings (higher is better)."""

    name = "clip"
    default_model = CLIP_VIT_L14
    default_processor: str | None = None
    logit_scale_from_model = False

    def __init__(self, model, tokenizer, processor, *, model_name: str = "", **kwargs):
        self.input_size = int(processor.crop_size["height"]) if getattr(processor, "crop_size", None) \
            else int(model.config.vision_config.image_size)
        self.mean = tuple(processor.image_mean)
        self.std = tuple(processor.image_std)
        super().__init__(model_name=model_name, **kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.freeze()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = features(self.model.get_image_features(pixel_values=pixels)).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length,
                               return_tensors="pt")
        feats = features(self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                                      attention_mask=batch["attention_mask"].to(self.device))).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def scale(self) -> torch.Tensor | float:
        return self.model.logit_scale.exp().float() if self.logit_scale_from_model else 100.0

    def combine(self, image_feats, text_feats):
        return self.scale() * (image_feats * text_feats.to(image_feats.device)).sum(-1)

    def reference_pixels(self, pil_images: list) -> torch.Tensor:
        return self.processor(images=pil_images, return_tensors="pt")["pixel_values"]

    @classmethod
    def load(cls, model: str | None = None, *, processor: str | None = None, device=None, precision=None,
             **kwargs) -> "CLIPReward":
        """From a Hub id or a local ``CLIPModel`` folder; the tokenizer and image processor come from
        *processor* (default: the folder itself when it has them, else ``default_processor``)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessor, CLIPModel

        spec = model or cls.default_model
        local = check_local(spec, what=f"{cls.name} model")
        if local is not None and local.is_file():
            raise ValueError(f"{cls.name} takes a CLIPModel folder or Hub id, not the file {spec!r}")
        try:
            clip = CLIPModel.from_pretrained(spec, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise RewardLoadError(f"could not load {cls.name} model {spec!r}: {first_line(err, 110)}. If you are "
                                  f"offline, download it first (`hf download {spec}`) and pass the local folder") \
                from None
        candidates = [processor] if processor else [spec] + ([cls.default_processor] if cls.default_processor else [])
        proc = tok = None
        for source in candidates:
            try:
                tok = tok or AutoTokenizer.from_pretrained(source)
                proc = proc or AutoImageProcessor.from_pretrained(source)
            except (OSError, ValueError):
                continue
            if proc is not None and tok is not None:
                break
        if tok is None:
            raise RewardLoadError(f"no tokenizer for {cls.name} model {spec!r} (tried {', '.join(candidates)}); pass "
                                  "a folder with the tokenizer files")
        if proc is None:
            size = int(clip.config.vision_config.image_size)
            proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        reward = cls(clip, tok, proc, model_name=spec, **kwargs)
        set_precision(reward, device, precision)
        return reward


class PickScore(CLIPReward):
    """PickScore v1: ``logit_scale.exp() * cos`` of a CLIP fine-tuned on Pick-a-Pic preferences."""

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    logit_scale_from_model = True

    @classmethod
    def load(cls, model: str | None = None, *, processor: str | None = None, **kwargs) -> "PickScore":
        spec = model or cls.default_model
        if processor is None and spec != cls.default_model and not (Path(spec).expanduser() / "tokenizer_config.json").is_file() \
                and Path(spec).expanduser().is_dir():
            processor = cls.default_processor
        return super().load(spec, processor=processor, **kwargs)


__all__ = ["CLIPReward", "PickScore"]
