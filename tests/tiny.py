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
