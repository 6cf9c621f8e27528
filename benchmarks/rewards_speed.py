#!/usr/bin/env python
"""Seconds per scored image and per steering step for each reward model, on random towers of the
ViT-B/32, ViT-L/14 and ViT-H/14 sizes (no download: models are built from configs). JSON out.

    python benchmarks/rewards_speed.py --sizes B/32 L/14 H/14 --threads 1 --out rewards_speed.json

- ``score``: metric mode, one 256x256 image, no gradient (preprocessing + image tower + head; the
  caption's text features are cached, as in a run).
- ``step``: one steering step, one 256x256 image: differentiable resize, forward, backward to the pixels.

Towers per size: ``clip`` / ``pickscore`` (a transformers CLIPModel of that size; the two rewards run
the same code, PickScore is a ViT-H/14), ``hps`` (an open_clip CLIP of that size; HPSv2 is a ViT-H/14),
``aesthetic`` (that CLIP's image tower + the MLP; the real one uses ViT-L/14) and ``imagereward`` (a BLIP
image tower of that size with ImageReward's BERT-base cross-attention text encoder; the real one is ViT-L/16).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

# benchmarks/common.py: run as ``python benchmarks/rewards_speed.py``, this file's folder is first on sys.path
from common import tests_module


SIZES = {"B/32": "ViT-B-32", "L/14": "ViT-L-14", "H/14": "ViT-H-14"}
REWARDS = ("clip", "hps", "aesthetic", "imagereward")
CAPTION = "a lighthouse at dusk, oil painting"


def _hf_clip_config(arch: str):
    import open_clip
    from transformers import CLIPConfig

    cfg = open_clip.get_model_config(arch)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    vheads = v["width"] // v.get("head_width", 64)
    return CLIPConfig(
        text_config=dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_attention_heads=t["heads"],
                         num_hidden_layers=t["layers"], vocab_size=49408, max_position_embeddings=77,
                         hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"], num_attention_heads=vheads,
                           num_hidden_layers=v["layers"], image_size=v["image_size"], patch_size=v["patch_size"],
                           hidden_act="gelu"),
        projection_dim=cfg["embed_dim"])


def build(name: str, arch: str):
    """A reward of *name* with random weights in the *arch*-sized tower."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from guidance.rewards import AestheticPredictor, CLIPReward, HPSv2, ImageReward

    clip_tokenizer_dir = tests_module("tiny").clip_tokenizer_dir

    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    if name == "clip":
        clip = CLIPModel(_hf_clip_config(arch)).eval()
        return CLIPReward(clip, CLIPTokenizer.from_pretrained(clip_tokenizer_dir()), proc, model_name=f"random {arch}")
    if name == "aesthetic":
        from guidance.rewards.aesthetic import AestheticMLP

        clip = CLIPModel(_hf_clip_config(arch)).eval()
        return AestheticPredictor(clip, AestheticMLP(clip.config.projection_dim), proc, model_name=f"random {arch}")
    if name == "hps":
        import open_clip

        model = open_clip.CLIP(**open_clip.get_model_config(arch)).eval()
        return HPSv2(model, open_clip.get_tokenizer(arch), model_name=f"random {arch}")
    if name == "imagereward":
        import tempfile

        from transformers import BlipVisionConfig, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        import open_clip
        from guidance.rewards.imagereward import RewardHead, image_reward_tokenizer, text_config_from_med

        tiny_rewards = tests_module("tiny_rewards")
        med_config, write_bert_vocab = tiny_rewards.med_config, tiny_rewards.write_bert_vocab
        v = open_clip.get_model_config(arch)["vision_cfg"]
        vision = BlipVisionModel(BlipVisionConfig(hidden_size=v["width"], intermediate_size=4 * v["width"],
                                                  num_hidden_layers=v["layers"],
                                                  num_attention_heads=v["width"] // v.get("head_width", 64),
                                                  image_size=224, patch_size=v["patch_size"], layer_norm_eps=1e-6))
        tok = image_reward_tokenizer(str(write_bert_vocab(Path(tempfile.mkdtemp()))))
        med = med_config(30524, tiny=False)
        med["encoder_width"] = v["width"]
        text = BlipTextModel(text_config_from_med(med), add_pooling_layer=False)
        return ImageReward(vision.eval(), text.eval(), RewardHead(768).eval(), tok, model_name=f"random {arch}")
    raise ValueError(name)


def _time(fn, repeats: int) -> float:
    fn()                                   # warm-up (allocations, text cache)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(name: str, arch: str, repeats: int, checkpointing: bool) -> dict:
    t0 = time.perf_counter()
    reward = build(name, arch)
    reward.set_prompts(CAPTION)
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in reward.parameters())
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))

    def score():
        reward.score_reference(image, CAPTION)

    def step():
        reward.gradient_checkpointing = checkpointing
        pixels = image.clone().requires_grad_()
        reward(pixels).total.backward()

    row = {"reward": name, "size": arch, "params_m": round(params / 1e6, 1), "build_s": round(built, 2),
           "score_s_per_image": round(_time(score, repeats), 3), "step_s": round(_time(step, repeats), 3)}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the steering step")
    p.add_argument("--out", default="rewards_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        for name in args.rewards:
            row = measure(name, SIZES[size], args.repeats, args.checkpointing)
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"benchmark": "rewards_speed", "command": " ".join(sys.argv), "threads": args.threads,
           "repeats": args.repeats, "checkpointing": args.checkpointing, "image": "1x3x256x256 fp32, CPU",
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
