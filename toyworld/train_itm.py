"""Train the toy world's image-text matching model (the compositional reward) and save it as a
transformers ``BlipForImageTextRetrieval`` folder with its ``BlipProcessor``.

A tiny BLIP: a ViT over 8-pixel patches of the 64x64 image and a BERT-style text encoder whose layers
cross-attend to the patches; the ITM head reads the [CLS] state. It is trained as a binary classifier
on (image, caption) pairs: each scene's own caption is a match, and ``NEGATIVES`` of its hard negatives
(``toyworld.negatives``: swapped colours, the opposite or reversed relation, another count, ...) are
not. Images are made imperfect and lightly augmented (never flipped) as the CLIPs' are, so the model
also scores images being generated. It is the toy counterpart of ImageReward / VQAScore: an objective
(``--reward itm:toy``), a verifier for best-of-N search and a metric; it never judges the benchmark
(the rule does).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import object_mask, sample_scenes
from .tokenizer import write_bert_tokenizer
from .train_clip import CLIP_MEAN, CLIP_STD, _imperfect, guidance_augment, normalise
from .train_state import Checkpointer

ITM_SEED = 7007
NEGATIVES = 3
RECIPE = dict(steps=3000, batch_size=48, lr=1e-3, image_size=64, patch_size=8, hidden=96, layers=4, heads=4,
              text_layers=4, imperfect_prob=0.3, curriculum=0.3)


def make_config(vocab_size: int, r: dict = RECIPE):
    from transformers import BlipConfig

    h = r["hidden"]
    vision = dict(image_size=r["image_size"], patch_size=r["patch_size"], hidden_size=h, intermediate_size=4 * h,
                  num_hidden_layers=r["layers"], num_attention_heads=r["heads"], layer_norm_eps=1e-6)
    text = dict(vocab_size=vocab_size, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=r["text_layers"],
                num_attention_heads=r["heads"], encoder_hidden_size=h, max_position_embeddings=40, pad_token_id=0,
                bos_token_id=2, eos_token_id=3, sep_token_id=3)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=h)


def processor_for(folder: Path, image_size: int):
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    tokenizer = BertTokenizer.from_pretrained(str(folder))
    images = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD), do_convert_rgb=True, resample=3)
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


def _pairs(batch, rng: np.random.Generator) -> tuple[list[int], list[str], list[float]]:
    """(image index, caption, label) of every training pair of a batch: the caption, then NEGATIVES
    hard negatives of the scene's prompt."""
    from .negatives import hard_negatives

    owners, texts, labels = [], [], []
    for i, (caption, prompt, scene) in enumerate(zip(batch.captions, batch.prompts, batch.scenes)):
        owners.append(i)
        texts.append(caption)
        labels.append(1.0)
        for q in hard_negatives(prompt, scene, k=NEGATIVES, generator=rng):
            owners.append(i)
            texts.append(q.text)
            labels.append(0.0)
    return owners, texts, labels


@torch.no_grad()
def evaluate(model, tokenizer, per_category: int = 64, noise: float = 0.0) -> dict[str, float]:
    """Per category, how often the true prompt scores above every hard negative (``ranking_accuracy``)."""
    from guidance.rewards.itm import match_logodds

    from .evaluation import ranking_accuracy

    model.eval()

    def score(x, texts):
        embeds = model.vision_model(pixel_values=normalise(x)).last_hidden_state
        out = []
        for i, caps in enumerate(texts):
            tok = tokenizer(caps, padding=True, return_tensors="pt")
            out.append(match_logodds(model, embeds[i : i + 1].expand(len(caps), -1, -1), tok["input_ids"],
                                     tok["attention_mask"]))
        return out

    return ranking_accuracy(score, per_category, noise=noise)


def train_itm(out_dir: str | Path, steps: int | None = None, log=print, resume: bool = False) -> dict:
    """Train the toy ITM model from its seed, save it to ``out_dir`` and measure it. Returns metrics."""
    from transformers import BlipForImageTextRetrieval

    from guidance.rewards.itm import match_logodds

    r = RECIPE
    steps = steps or r["steps"]
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(ITM_SEED)
    rng = np.random.default_rng(ITM_SEED)
    gen = torch.Generator().manual_seed(ITM_SEED)
    write_bert_tokenizer(out_dir)
    processor = processor_for(out_dir, r["image_size"])
    tokenizer = processor.tokenizer
    model = BlipForImageTextRetrieval(make_config(len(tokenizer), r)).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.05, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    aug = guidance_augment(r["image_size"])
    mild = guidance_augment(r["image_size"], mild=True)
    ckpt = Checkpointer(out_dir / ".training", "itm", resume=resume, log=log,
                        objects={"model": model, "opt": opt, "sched": sched}, np_rng=rng, generators={"gen": gen})
    first, extra = ckpt.start()
    running = extra.get("running")
    pos_weight = torch.tensor(float(NEGATIVES))  # as much weight on the one match as on its negatives
    for step in range(first, steps):
        early = step < int(r["curriculum"] * steps)
        batch = sample_scenes(r["batch_size"], rng, legacy_caption_prob=0.3, plain_article_prob=0.25)
        x = batch.tensors()
        union = torch.from_numpy(np.stack([object_mask(sc, x.shape[-1]) for sc in batch.scenes]))
        x, _ = _imperfect(x, union, rng, 0.0 if early else r["imperfect_prob"], gen)
        x = (mild if early else aug)(x).clamp(0, 1)
        owners, texts, labels = _pairs(batch, rng)
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        embeds = model.vision_model(pixel_values=normalise(x)).last_hidden_state
        logits = match_logodds(model, embeds[torch.tensor(owners)], tok["input_ids"], tok["attention_mask"])
        loss = F.binary_cross_entropy_with_logits(logits, torch.tensor(labels), pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"[itm] step {step}/{steps} loss {running:.3f} ({time.perf_counter() - t0:.0f}s)")
        if step % 1000 == 999:
            log(f"[itm] step {step} ranking accuracy {evaluate(model, tokenizer, per_category=32)}")
            model.train()
        ckpt.step_done(step, {"running": running})
    train_time = ckpt.elapsed()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(out_dir), safe_serialization=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(str(out_dir))
    ckpt.finish()
    loaded = BlipForImageTextRetrieval.from_pretrained(str(out_dir)).float()
    return {"name": "itm", "seed": ITM_SEED, "steps": steps, "batch_size": r["batch_size"], "negatives": NEGATIVES,
            "params": sum(p.numel() for p in model.parameters()), "train_seconds": train_time, "recipe": dict(r),
            "hard_negatives": {"clean": evaluate(loaded, tokenizer), "noisy": evaluate(loaded, tokenizer, noise=0.1)}}
