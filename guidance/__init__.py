"""clipsteer's CLIP guidance: encoders, prompts, cutouts, losses and ``CLIPLoss``.

>>> from guidance import CLIPLoss, Cutouts, load_encoder      # doctest: +SKIP
>>> clip = load_encoder("openai/clip-vit-base-patch32")
>>> loss_fn = CLIPLoss(clip, "a lighthouse at dusk:1|fog:0.5|blurry:-0.5", cutouts=Cutouts(32))
>>> out = loss_fn(images)            # images: [B, 3, H, W] in [0, 1], requires_grad
>>> out.total.backward()

Scoring (torchmetrics-compatible CLIP score): ``clip_score(images, prompts, model=...)``,
``CLIPScore`` (update / compute / reset). Nothing here imports a generator; generators receive an ``Objective`` (``CLIPLoss`` is one).
"""

from .clip_loss import CLIPLoss
from .cutouts import DEFAULT_AUGMENTATIONS, Cutouts, augmentation_names, build_augmentations
from .images import check_image_file, load_image, read_image
from .objective import ConditioningOnly, LossOutput, Objective, WeightedObjectives, check_image_values, check_images
from .encoders import Encoder, HFCLIPEncoder, OpenCLIPEncoder, load_encoder, parse_encoder_spec
from .losses import (clamp_with_grad, cosine_distance, range_loss, saturation_loss, spherical_distance, symmetry_loss,
                     tv_loss)
from .prompts import Prompt, PromptSchedule, image_prompts, parse_prompt, parse_prompts, parse_schedule
from .runtime import resolve_device, resolve_dtype
from .score import CLIPScore, ScoreModel, clip_score, get_score_model, image_similarity

__all__ = [
    "CLIPLoss", "LossOutput", "Objective", "WeightedObjectives", "ConditioningOnly", "check_images", "check_image_values",
    "load_image", "read_image", "check_image_file",
    "Cutouts", "DEFAULT_AUGMENTATIONS", "augmentation_names", "build_augmentations",
    "Encoder", "HFCLIPEncoder", "OpenCLIPEncoder", "load_encoder", "parse_encoder_spec",
    "clamp_with_grad", "spherical_distance", "cosine_distance", "tv_loss", "range_loss", "saturation_loss", "symmetry_loss",
    "Prompt", "PromptSchedule", "parse_prompt", "parse_prompts", "parse_schedule", "image_prompts",
    "resolve_device", "resolve_dtype",
    "clip_score", "image_similarity", "CLIPScore", "ScoreModel", "get_score_model",
]
