"""Image-text matching (ITM) as a reward: BLIP's ITM head (Li et al. 2022), the cross-attention
counterpart of CLIP's bag-of-words cosine. The caption's tokens attend to the image patches and a
binary head says whether they match, so the score depends on which colour is bound to which object,
how many there are and where -- what compositional benchmarks (GenEval, T2I-CompBench) probe and what
VQAScore-style rewards reward.

Score = ``logit(match) - logit(no match)`` of the ITM head (the log-odds of a match; higher is better),
differentiable in the images.

Models: any transformers ``BlipForImageTextRetrieval`` folder or Hub id with its processor
(``Salesforce/blip-itm-base-coco``, the default; ``Salesforce/blip-itm-large-coco``), or ``toy``: the
toy world's ITM model (``toyworld/weights/itm``, trained with hard negatives by
``scripts/train_toy.py --only itm``).

    --reward itm:toy=1          # steer by it (toy world)
    --metric itm:toy            # judge by it (scripts/evaluate.py)
"""

from __future__ import annotations

import torch

from .base import Reward, RewardLoadError, set_precision

HUB_REPO = "Salesforce/blip-itm-base-coco"


class ITMReward(Reward):
    """BLIP's image-text matching head as a reward: log-odds that the caption matches the image."""

    name = "itm"
    default_model = HUB_REPO

    def __init__(self, model, processor, *, model_name: str = "", **kwargs):
        image_processor = processor.image_processor
        self.input_size = int(model.config.vision_config.image_size)
        self.mean = tuple(image_processor.image_mean)
        self.std = tuple(image_processor.image_std)
        super().__init__(model_name=model_name, **kwargs)
        self.model = model
        self.processor = processor
        self.max_length = int(getattr(processor.tokenizer, "model_max_length", 35) or 35)
        self.freeze()

    def image_features(self, pixels):
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def text_features(self, texts):
        batch = self.processor.tokenizer(texts, padding="max_length", truncation=True,
                                         max_length=min(self.max_length, 64), return_tensors="pt")
        return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)   # [N, 2, L] (ids, mask)

    def combine(self, image_feats, text_feats):
        text_feats = text_feats.to(image_feats.device)
        return match_logodds(self.model, image_feats, text_feats[:, 0], text_feats[:, 1])

    def reference_pixels(self, pil_images: list) -> torch.Tensor:
        """The model's own ``BlipImageProcessor`` (PIL resize, rescale, normalise)."""
        return self.processor.image_processor(pil_images, return_tensors="pt")["pixel_values"]

    @classmethod
    def load(cls, model: str | None = None, *, device=None, precision=None, **kwargs) -> "ITMReward":
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        spec = model or HUB_REPO
        if spec == "toy":
            from toyworld.paths import weights_dir

            spec = str(weights_dir("itm"))
        try:
            net = BlipForImageTextRetrieval.from_pretrained(spec, use_safetensors=True)
            processor = BlipProcessor.from_pretrained(spec)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RewardLoadError(f"could not load the ITM model {spec!r} ({first[:120]}); give a "
                                  "BlipForImageTextRetrieval folder with model.safetensors or a Hub id such as "
                                  f"{HUB_REPO} (downloaded first when offline)") from None
        reward = cls(net.eval(), processor, model_name=model or HUB_REPO, **kwargs)
        set_precision(reward, device, precision)
        return reward


def match_states(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]``: a ``BlipForImageTextRetrieval``'s text encoder states for captions ``[B, L]`` attending
    to image patch embeddings ``[B, P, D]`` (the ITM head reads position 0)."""
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    return model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_mask).last_hidden_state


def logodds_from_states(model, states: torch.Tensor) -> torch.Tensor:
    """``[B]`` log-odds of a match from ``match_states``' output (as the model's forward computes them)."""
    logits = model.itm_head(states[:, 0, :]).float()
    return logits[:, 1] - logits[:, 0]


def match_logodds(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` log-odds of a match from a ``BlipForImageTextRetrieval``'s text encoder and ITM head, for
    image patch embeddings ``[B, P, D]`` and captions ``[B, L]`` (as that model's forward computes them)."""
    return logodds_from_states(model, match_states(model, image_embeds, input_ids, attention_mask))


__all__ = ["ITMReward", "match_logodds", "match_states", "logodds_from_states", "HUB_REPO"]
