"""Tiny models built from configs in code, with no download (as diffusers' tests do)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from toyworld.tokenizer import write_clip_tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / ".cache" / "clip_tokenizer"


@functools.lru_cache(maxsize=None)
def clip_tokenizer_dir() -> Path:
    """The real CLIP BPE tokenizer files, written once per test session from open_clip's vocabulary."""
    if not (TOKENIZER_DIR / "merges.txt").exists():
        write_clip_tokenizer(TOKENIZER_DIR)
    return TOKENIZER_DIR


def tiny_clip_model(seed: int = 0, image_size: int = 32, projection_dim: int = 16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=4),
        projection_dim=projection_dim,
    )
    return CLIPModel(config).eval()


def save_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A complete CLIP folder (model, tokenizer, image processor) as a Hub download would be."""
    import shutil

    from transformers import CLIPImageProcessor

    folder = Path(folder)
    tiny_clip_model(seed, image_size).save_pretrained(folder)
    for f in clip_tokenizer_dir().iterdir():
        shutil.copy(f, folder / f.name)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def tiny_encoder(seed: int = 0, image_size: int = 32):
    from transformers import CLIPTokenizer

    from guidance import HFCLIPEncoder

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    return HFCLIPEncoder(tiny_clip_model(seed, image_size), tokenizer, name=f"tiny-clip-{seed}")


# -- Stable Diffusion ----------------------------------------------------------------------------
# Stable Diffusion 1.x's noise schedule (what its model_index ships in scheduler_config.json).
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                           steps_offset=1, clip_sample=False)


def tiny_sd_components(seed: int = 0, *, prediction_type: str = "epsilon", sample_size: int = 8) -> dict:
    """Tiny UNet / AutoencoderKL (8x down, as SD's) / CLIP text encoder / real CLIP tokenizer / PNDM
    scheduler, built from configs the way diffusers' ``get_dummy_components()`` does.
    Images are ``sample_size * 8`` pixels square; pass to ``StableDiffusionPipeline(**components)``."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=sample_size * 8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    scheduler = PNDMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"},
                              prediction_type=prediction_type)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False)


def tiny_sd_pipeline(seed: int = 0, **kwargs):
    """A ``StableDiffusionPipeline`` over :func:`tiny_sd_components` (CPU, float32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(folder: Path, seed: int = 0, **kwargs) -> Path:
    """A complete diffusers pipeline folder (safetensors weights), as a Hub download would be."""
    folder = Path(folder)
    tiny_sd_pipeline(seed, **kwargs).save_pretrained(folder)
    return folder


def tiny_taesd(seed: int = 0):
    """A tiny ``AutoencoderTiny`` (TAESD layout: 4 latent channels, 8x up) for the tiny SD latents."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                           latent_channels=4).eval()
