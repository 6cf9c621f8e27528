"""ImageReward (Xu et al. 2023): a BLIP (ViT-L/16 image tower, BERT-base text encoder with cross-attention
to the image) with an MLP head, trained on 137k expert comparisons of text-to-image outputs.
Score = ``(mlp(text_state[CLS]) - 0.16717362830052426) / 1.0333394966054072``, the authors' numbers.

Built on transformers' own BLIP classes (``BlipVisionModel`` + ``BlipTextModel`` with
cross-attention), not on the ``image-reward`` package: that package's BLIP code imports helpers
transformers 5 removed (``transformers.modeling_utils.apply_chunking_to_forward``) and needs
fairscale and old timm, so it does not import beside this project's pins. transformers' BLIP is a
port of the same BLIP code, so the checkpoint's tensors map one to one (:func:`convert_state_dict`).

Weights: ``ImageReward.pt`` and ``med_config.json`` from ``THUDM/ImageReward``, the tokenizer of
``bert-base-uncased`` with ImageReward's two added tokens (``[DEC]`` as bos, ``[ENC]``); or a
local folder with ``ImageReward.pt`` (or ``.safetensors``), ``med_config.json`` and optionally
the tokenizer files (``vocab.txt``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .base import Reward, ScoreHead, RewardLoadError, check_local, find_weights, hub_file, load_state_dict, set_precision

HUB_REPO = "THUDM/ImageReward"
TOKENIZER = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
#: ImageReward's ViT-L/16 image tower (BLIP ``create_vit('large', 224)``).
VISION_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")


RewardHead = ScoreHead   # the released head; one class for both rewards


_VISION_MAP = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """ImageReward.pt keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) ->
    ``{"vision": ..., "text": ..., "head": ...}`` for the transformers classes. Other BLIP parts
    (projections, momentum encoders) are not used by the score and are dropped."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION_MAP:
                if re.match(pattern, rest):
                    out["vision"][re.sub(pattern, repl, rest)] = value
                    break
        elif key.startswith("blip.text_encoder."):
            rest = key[len("blip.text_encoder."):]
            if not rest.endswith("position_ids"):
                out["text"][rest] = value
        elif key.startswith("mlp."):
            out["head"][key[len("mlp."):]] = value
    return out


def text_config_from_med(med: dict):
    """A ``BlipTextConfig`` from ImageReward's ``med_config.json`` (a BERT config with ``encoder_width``)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                          encoder_hidden_size=med.get("encoder_width", med["hidden_size"]),
                          intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
                          num_attention_heads=med["num_attention_heads"],
                          max_position_embeddings=med["max_position_embeddings"],
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None,
                          sep_token_id=None)


def vision_config_for(state: dict[str, torch.Tensor], heads: int | None = None):
    """The ``BlipVisionConfig`` a converted vision state dict needs (ViT-L/16 for the real weights)."""
    from transformers import BlipVisionConfig

    width = state["embeddings.patch_embedding.weight"].shape[0]
    patch = state["embeddings.patch_embedding.weight"].shape[-1]
    positions = state["embeddings.position_embedding"].shape[1] - 1
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    inter = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    if heads is None:
        heads = VISION_LARGE["num_attention_heads"] if width == VISION_LARGE["hidden_size"] else max(1, width // 64)
    return BlipVisionConfig(hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=int(round(positions ** 0.5)) * patch,
                            patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0)


def image_reward_tokenizer(source: str):
    """BERT tokenizer with ImageReward's additions: ``[DEC]`` as bos token, ``[ENC]`` as an extra token."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(source)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(Reward):
    """ImageReward on transformers' BLIP: the caption's [CLS] state after cross-attending to the image,
    through the MLP head, standardised with the authors' mean and std."""

    name = "imagereward"
    default_model = HUB_REPO

    def __init__(self, vision, text, head, tokenizer, *, model_name: str = "", **kwargs):
        self.input_size = int(vision.config.image_size)
        super().__init__(model_name=model_name, **kwargs)
        self.vision = vision
        self.text = text
        self.head = head
        self.tokenizer = tokenizer
        self.freeze()

    def image_features(self, pixels):
        return self.vision(pixel_values=pixels).last_hidden_state

    def text_features(self, texts):
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                               return_tensors="pt")
        return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)   # [N, 2, L] (ids, mask)

    def combine(self, image_feats, text_feats):
        text_feats = text_feats.to(image_feats.device)
        ids, mask = text_feats[:, 0], text_feats[:, 1]
        image_mask = torch.ones(image_feats.shape[:2], dtype=torch.long, device=image_feats.device)
        state = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_feats,
                          encoder_attention_mask=image_mask).last_hidden_state[:, 0, :]
        return ((self.head(state).float() - MEAN) / STD).squeeze(-1)

    def reference_pixels(self, pil_images: list) -> torch.Tensor:
        """ImageReward's ``_transform(224)``: PIL bicubic Resize (shortest side), CenterCrop, ToTensor, Normalize."""
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        tf = Compose([Resize(self.input_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(self.input_size),
                      ToTensor(), Normalize(self.mean, self.std)])
        return torch.stack([tf(im.convert("RGB")) for im in pil_images])

    @classmethod
    def load(cls, model: str | None = None, *, tokenizer: str | None = None, device=None, precision=None,
             **kwargs) -> "ImageReward":
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        spec = model or HUB_REPO
        local = check_local(spec, what="ImageReward")
        if local is None:
            weights = hub_file(spec, "ImageReward.pt", what="ImageReward")
            med_file = hub_file(spec, "med_config.json", what="ImageReward")
            tok_source = tokenizer or TOKENIZER
        else:
            folder = local if local.is_dir() else local.parent
            weights = local if local.is_file() else find_weights(local, ["ImageReward.safetensors", "ImageReward.pt"],
                                                                 what="ImageReward")
            med_file = folder / "med_config.json"
            if not med_file.is_file():
                raise FileNotFoundError(f"ImageReward needs med_config.json next to {str(weights)!r}")
            tok_source = tokenizer or (str(folder) if (folder / "vocab.txt").is_file() else TOKENIZER)
        parts = convert_state_dict(load_state_dict(weights, what="ImageReward"))
        if not parts["vision"] or not parts["text"] or not parts["head"]:
            raise RewardLoadError(f"{str(weights)!r} is not an ImageReward checkpoint (no blip.visual_encoder, "
                                  "blip.text_encoder or mlp tensors)")
        med = json.loads(Path(med_file).read_text())
        try:
            tok = image_reward_tokenizer(tok_source)
        except (OSError, ValueError) as err:
            raise RewardLoadError(f"could not load the ImageReward tokenizer {tok_source!r}: {err}. If you are "
                                  f"offline, download it first (`hf download {TOKENIZER}`)") from None
        vision = BlipVisionModel(vision_config_for(parts["vision"], med.get("vision_heads")))
        text = BlipTextModel(text_config_from_med(med), add_pooling_layer=False)
        head = RewardHead(int(med["hidden_size"]))
        for module, state, what in ((vision, parts["vision"], "image tower"), (text, parts["text"], "text encoder"),
                                    (head, parts["head"], "MLP head")):
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as err:
                lines = str(err).splitlines()
                raise RewardLoadError(f"ImageReward {what} in {str(weights)!r} does not fit: "
                                      f"{(lines[1] if len(lines) > 1 else lines[0]).strip()}") from None
        reward = cls(vision.eval(), text.eval(), head.eval(), tok, model_name=spec, **kwargs)
        set_precision(reward, device, precision)
        return reward


__all__ = ["ImageReward", "RewardHead", "convert_state_dict", "text_config_from_med", "image_reward_tokenizer"]
