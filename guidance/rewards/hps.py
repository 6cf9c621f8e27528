"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H/14 fine-tuned on
the HPD v2 human preference pairs. Score = ``cos(image, caption)`` of the normalised embeddings
(the diagonal of ``image_features @ text_features.T``, as the authors' ``hpsv2.score``).

Weights: ``HPS_v2.1_compressed.pt`` (default, ``hps`` or ``hps:v2.1``) or ``HPS_v2_compressed.pt``
(``hps:v2``) from the ``xswu/HPSv2`` Hub repository; a local checkpoint file or a folder holding
one. A folder may carry an ``open_clip_config.json`` (``{"model_cfg": {...}}``, open_clip's own
format) for another architecture; the default is open_clip's ``ViT-H-14`` config.
Checkpoints are read with ``torch.load(weights_only=True)`` (their ``state_dict`` entry) or safetensors.
"""

from __future__ import annotations

import json

import torch

from .base import Reward, RewardLoadError, check_local, find_weights, hub_file, load_state_dict, require, set_precision

HUB_REPO = "xswu/HPSv2"
VERSIONS = {"v2": "HPS_v2_compressed.pt", "v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_VERSION = "v2.1"
ARCH = "ViT-H-14"


class HPSv2(Reward):
    """HPSv2(.1) as a reward: cosine of an open_clip CLIP's image and caption embeddings."""

    name = "hps"
    default_model = DEFAULT_VERSION

    def __init__(self, model, tokenizer, *, model_name: str = "", **kwargs):
        size = model.visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(model.visual, "image_mean", None) or Reward.mean)
        self.std = tuple(getattr(model.visual, "image_std", None) or Reward.std)
        super().__init__(model_name=model_name, **kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.freeze()

    def image_features(self, pixels):
        return self.model.encode_image(pixels, normalize=True).float()

    def text_features(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float()

    def combine(self, image_feats, text_feats):
        return (image_feats * text_feats.to(image_feats.device)).sum(-1)

    def reference_pixels(self, pil_images: list) -> torch.Tensor:
        """HPSv2's ``preprocess_val``: ToTensor, bicubic Resize (shortest side, antialiased) and
        CenterCrop on the float tensor, then Normalize."""
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        tf = Compose([ToTensor(), Resize(self.input_size, interpolation=InterpolationMode.BICUBIC),
                      CenterCrop(self.input_size), Normalize(self.mean, self.std)])
        return torch.stack([tf(im.convert("RGB")) for im in pil_images])

    @classmethod
    def load(cls, model: str | None = None, *, device=None, precision=None, **kwargs) -> "HPSv2":
        open_clip = require("open_clip", "open_clip_torch", "hps")
        spec = model or DEFAULT_VERSION
        config = None
        if spec.lower() in VERSIONS:
            path = hub_file(HUB_REPO, VERSIONS[spec.lower()], what="HPS")
        else:
            local = check_local(spec, what="HPS")
            if local is None:
                raise ValueError(f"unknown HPS model {spec!r}; give v2, v2.1, a checkpoint file or a folder")
            path = local
            if local.is_dir():
                cfg_file = local / "open_clip_config.json"
                if cfg_file.is_file():
                    config = json.loads(cfg_file.read_text()).get("model_cfg")
                path = find_weights(local, [VERSIONS["v2.1"], VERSIONS["v2"], "open_clip_model.safetensors"],
                                    what="HPS")
        state = load_state_dict(path, what="HPS")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        if config is None:
            config = open_clip.get_model_config(ARCH)
        clip = open_clip.CLIP(**config)
        try:
            clip.load_state_dict(state, strict=True)
        except RuntimeError as err:
            lines = str(err).splitlines()
            raise RewardLoadError(f"HPS checkpoint {str(path)!r} does not fit the {ARCH if config else ''} "
                                  f"architecture: {lines[1].strip() if len(lines) > 1 else lines[0]}") from None
        reward = cls(clip.eval(), open_clip.get_tokenizer(ARCH, context_length=clip.context_length),
                     model_name=str(model or f"{HUB_REPO}:{VERSIONS[DEFAULT_VERSION]}"), **kwargs)
        set_precision(reward, device, precision)
        return reward


__all__ = ["HPSv2", "VERSIONS", "HUB_REPO"]
