"""The LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann, 2022): an MLP on
L2-normalised CLIP ViT-L/14 image embeddings, trained on SAC, LAION-Logos and AVA ratings; it
predicts a 1-10 rating and ignores the caption.

Weights: the MLP ``sac+logos+ava1-l14-linearMSE.pth`` (a plain state dict, ``layers.*`` keys) from
the ``camenduru/improved-aesthetic-predictor`` Hub mirror (``aesthetic:ORG/REPO`` for another
repository holding that file), and CLIP ``openai/clip-vit-large-patch14``.
A local MLP file (``aesthetic:/path/mlp.pth`` or ``.safetensors``) or a folder holding an MLP file
plus a transformers CLIP (``config.json``) may be given instead; ``clip=`` picks another CLIP.
Reference preprocessing (metric mode) is the OpenAI CLIP transform the original code used:
PIL bicubic resize of the short side, centre crop, normalise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..encoders import CLIP_VIT_L14, features
from .base import Reward, ScoreHead, RewardLoadError, check_local, hub_file, load_state_dict, set_precision

HUB_REPO = "camenduru/improved-aesthetic-predictor"
MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
CLIP = CLIP_VIT_L14


AestheticMLP = ScoreHead   # the released head; one class for both rewards


class AestheticPredictor(Reward):
    """LAION aesthetic predictor v2 as a reward (caption-free): ``mlp(normalise(clip_image_embedding))``."""

    name = "aesthetic"
    uses_text = False
    default_model = HUB_REPO

    def __init__(self, clip, head, processor, *, model_name: str = "", **kwargs):
        self.input_size = int(processor.crop_size["height"]) if getattr(processor, "crop_size", None) \
            else int(clip.config.vision_config.image_size)
        self.mean = tuple(processor.image_mean)
        self.std = tuple(processor.image_std)
        super().__init__(model_name=model_name, **kwargs)
        self.clip = clip
        self.head = head
        self.processor = processor
        self.freeze()

    def image_features(self, pixels):
        feats = features(self.clip.get_image_features(pixel_values=pixels)).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def combine(self, image_feats, text_feats):
        return self.head(image_feats.to(self.head.layers[0].weight.dtype)).float().squeeze(-1)

    def reference_pixels(self, pil_images: list) -> torch.Tensor:
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        tf = Compose([Resize(self.input_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(self.input_size),
                      ToTensor(), Normalize(self.mean, self.std)])
        return torch.stack([tf(im.convert("RGB")) for im in pil_images])

    @classmethod
    def load(cls, model: str | None = None, *, clip: str | None = None, device=None, precision=None,
             **kwargs) -> "AestheticPredictor":
        from transformers import CLIPImageProcessor, CLIPModel

        spec = model or cls.default_model
        local = check_local(spec, what="aesthetic predictor")
        clip_source = clip or CLIP
        if local is None:
            mlp_file = hub_file(spec, MLP_FILE, what="aesthetic predictor")
        elif local.is_dir():
            files = sorted(p for p in local.iterdir() if p.suffix in (".pth", ".pt", ".safetensors")
                           and p.name != "model.safetensors")
            if len(files) != 1:
                raise FileNotFoundError(f"aesthetic folder {spec!r} needs exactly one MLP file (.pth/.safetensors "
                                        f"other than model.safetensors); found {len(files)}")
            mlp_file = files[0]
            if clip is None and (local / "config.json").is_file():
                clip_source = str(local)
        else:
            mlp_file = local
        state = load_state_dict(mlp_file, what="aesthetic predictor")
        state = {k if k.startswith("layers.") else f"layers.{k}": v for k, v in state.items()}
        if "layers.0.weight" not in state:
            raise RewardLoadError(f"{str(mlp_file)!r} is not an aesthetic-predictor MLP (no layers.0.weight)")
        head = AestheticMLP(int(state["layers.0.weight"].shape[1]))
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            lines = str(err).splitlines()
            raise RewardLoadError(f"aesthetic MLP {str(mlp_file)!r} does not fit: "
                                  f"{(lines[1] if len(lines) > 1 else lines[0]).strip()}") from None
        try:
            clip_model = CLIPModel.from_pretrained(clip_source, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise RewardLoadError(f"could not load the aesthetic predictor's CLIP {clip_source!r}: {err}. If you are "
                                  f"offline, download it first (`hf download {clip_source}`)") from None
        if clip_model.config.projection_dim != head.layers[0].in_features:
            raise RewardLoadError(f"the aesthetic MLP takes {head.layers[0].in_features}-d embeddings but CLIP "
                                  f"{clip_source!r} gives {clip_model.config.projection_dim}-d ones")
        try:
            processor = CLIPImageProcessor.from_pretrained(clip_source)
        except (OSError, ValueError):
            size = int(clip_model.config.vision_config.image_size)
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        reward = cls(clip_model.eval(), head.eval(), processor, model_name=str(Path(spec)) if local else spec, **kwargs)
        set_precision(reward, device, precision)
        return reward


__all__ = ["AestheticPredictor", "AestheticMLP", "HUB_REPO", "MLP_FILE"]
