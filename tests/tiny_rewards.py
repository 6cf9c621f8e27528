"""Reward-model checkpoints with random weights, built from each real architecture's config at reduced
width and saved in the layout the real checkpoint has, so loading goes through the same code path.

``scale`` shrinks widths and depths; ``scale=None`` keeps the real sizes (for benchmarks). Also used by
``benchmarks/rewards_speed.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

BERT_WORDS = ("a red green blue yellow circle square triangle cross on the of background photo fox in snow "
              "purple orange white black cat dog picture at dusk lighthouse").split()


def write_bert_vocab(folder: Path) -> Path:
    """A small WordPiece vocabulary (BERT's special tokens, some words, letters and ``##`` pieces)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS, *letters, *[f"##{c}" for c in letters],
              ",", ".", "'"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                               "tokenizer_class": "BertTokenizer"}))
    return folder


def clip_config(arch: str = "ViT-H-14", *, tiny: bool = True, image_size: int = 32) -> dict:
    """open_clip's config of *arch*, shrunk to a test size when *tiny* (same layout, fewer/narrower layers)."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if not tiny:
        return cfg
    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    v.update(layers=2, width=64, image_size=image_size, patch_size=8)
    if "head_width" in v:
        v["head_width"] = 32
    t.update(layers=2, width=64, heads=2)
    return {**cfg, "embed_dim": 32, "vision_cfg": v, "text_cfg": t}


def save_hps(folder: Path, seed: int = 0, *, tiny: bool = True, config: dict | None = None) -> Path:
    """A folder with ``open_clip_config.json`` and ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``, as
    the xswu/HPSv2 files are)."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config or clip_config("ViT-H-14", tiny=tiny)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    with torch.no_grad():                       # spread the random weights so scores differ per image
        model.logit_scale.fill_(4.6)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return folder


def blip_vision_config(*, tiny: bool = True, image_size: int = 32):
    from transformers import BlipVisionConfig

    from guidance.rewards.imagereward import VISION_LARGE

    cfg = dict(VISION_LARGE)
    if tiny:
        cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   image_size=image_size, patch_size=8)
    return BlipVisionConfig(**cfg, attention_dropout=0.0)


def med_config(vocab_size: int, *, tiny: bool = True, encoder_width: int = 128) -> dict:
    """ImageReward's ``med_config.json`` (bert-base-uncased plus ``encoder_width``), shrunk when *tiny*."""
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
           "encoder_width": 1024, "add_cross_attention": True}
    if tiny:
        med.update(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_hidden_layers=2,
                   max_position_embeddings=64, encoder_width=encoder_width)
    return med


_VISION_BACK = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]


def imagereward_state(vision, text, head) -> dict[str, torch.Tensor]:
    """The ``ImageReward.pt`` key layout (``blip.visual_encoder.*`` timm-style ViT keys, ``blip.text_encoder.*``
    BERT keys, ``mlp.layers.*``) from transformers modules."""
    state = {}
    for key, value in vision.state_dict().items():
        for pattern, repl in _VISION_BACK:
            if re.match(pattern, key):
                state["blip.visual_encoder." + re.sub(pattern, repl, key)] = value
                break
        else:
            raise KeyError(key)
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    return state


def save_imagereward(folder: Path, seed: int = 0, *, tiny: bool = True, state: dict | None = None,
                     med: dict | None = None) -> Path:
    """A folder with ``ImageReward.pt`` (a plain state dict, the real file's key layout), ``med_config.json``
    and a BERT tokenizer (``vocab.txt``)."""
    from transformers import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from guidance.rewards.imagereward import RewardHead, image_reward_tokenizer, text_config_from_med

    folder = write_bert_vocab(folder)
    vocab = len(image_reward_tokenizer(str(folder)))
    vision_cfg = blip_vision_config(tiny=tiny)
    med = med or med_config(vocab, tiny=tiny, encoder_width=vision_cfg.hidden_size)
    (folder / "med_config.json").write_text(json.dumps(med))
    if state is None:
        torch.manual_seed(seed)
        vision = BlipVisionModel(vision_cfg)
        text = BlipTextModel(text_config_from_med(med), add_pooling_layer=False)
        head = RewardHead(med["hidden_size"])
        with torch.no_grad():                   # BERT's 0.02 init barely lets the image through: widen it
            for name, p in [*text.named_parameters(), *head.named_parameters()]:
                if p.dim() == 2 and ("crossattention" in name or "layers" in name):
                    p.normal_(std=0.3 if "crossattention" in name else 0.1)
            for p in vision.parameters():       # BlipVisionConfig's initializer_range is 1e-10
                if p.dim() >= 2:
                    p.normal_(std=0.05)
        state = imagereward_state(vision, text, head)
    torch.save(state, folder / "ImageReward.pt")
    return folder


def save_aesthetic(folder: Path, seed: int = 0, *, clip_folder: Path | None = None) -> Path:
    """A folder with a transformers CLIP (the tiny test CLIP unless *clip_folder*) and the MLP as the
    original ``sac+logos+ava1-l14-linearMSE.pth`` stores it (``layers.*`` keys, plain state dict)."""
    import shutil

    from guidance.rewards.aesthetic import MLP_FILE, AestheticMLP
    from tiny import save_tiny_clip

    folder = Path(folder)
    if clip_folder is None:
        save_tiny_clip(folder, seed)
    else:
        shutil.copytree(clip_folder, folder, dirs_exist_ok=True)
    width = json.loads((folder / "config.json").read_text())["projection_dim"]
    torch.manual_seed(seed + 1)
    head = AestheticMLP(width)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.save(head.state_dict(), folder / MLP_FILE)
    return folder


__all__ = ["write_bert_vocab", "clip_config", "save_hps", "save_imagereward", "save_aesthetic", "imagereward_state",
           "med_config", "blip_vision_config"]
