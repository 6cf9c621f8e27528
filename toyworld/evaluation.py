"""How the toy models are measured in toy world v3: held-out scenes and prompts per category, judged by
the rule (``toyworld.rule``). Used by the trainers (TRAINING.md's tables) and their tests."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .prompts import CATEGORIES, Prompt, random_prompt
from .rule import category_scores, judge
from .scenes import draw_scene, scene_for

HELD_OUT_SEED = 999_331  # apart from every training seed and from both benchmark prompt sets' seeds


def held_out_prompts(per_category: int = 32, seed: int = HELD_OUT_SEED) -> list[Prompt]:
    """``per_category`` random prompts of each category (repeats allowed), in category order."""
    out = []
    for k, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, k])
        out += [random_prompt(category, rng) for _ in range(per_category)]
    return out


def held_out_scenes(per_category: int = 32, seed: int = HELD_OUT_SEED) -> tuple[list[Prompt], torch.Tensor]:
    """Held-out prompts and a drawn scene of each: float ``[N, 3, 64, 64]`` in [0, 1]."""
    prompts = held_out_prompts(per_category, seed)
    rng = np.random.default_rng([seed, 99])
    images = np.stack([draw_scene(scene_for(p, rng)) for p in prompts])
    return prompts, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def reconstruction_scores(reconstruct: Callable[[torch.Tensor], torch.Tensor], per_category: int = 64,
                          batch: int = 64) -> dict:
    """Per-category share of held-out scenes that are still right, by the rule, after
    ``reconstruct`` (images in [0, 1] -> images in [0, 1])."""
    prompts, x = held_out_scenes(per_category)
    rec = torch.cat([reconstruct(chunk).clamp(0, 1) for chunk in x.split(batch)])
    scores = category_scores(prompts, judge(rec, prompts))
    scores["mse"] = float(((rec - x) ** 2).mean())
    return scores


@torch.no_grad()
def ranking_accuracy(score: Callable[[torch.Tensor, list[list[str]]], list[torch.Tensor]], per_category: int = 64,
                     seed: int = HELD_OUT_SEED + 1, noise: float = 0.0) -> dict[str, float]:
    """Per category, the share of held-out scenes for which ``score`` ranks the true prompt above every hard
    negative of it (``negatives.hard_negatives``). ``score(images [N, 3, 64, 64] in [0, 1], texts per image)``
    returns one score tensor per image (higher = better match)."""
    from .negatives import hard_negatives

    out = {}
    gen = torch.Generator().manual_seed(seed)
    for k, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, k])
        prompts = [random_prompt(category, rng) for _ in range(per_category)]
        scenes = [scene_for(p, rng) for p in prompts]
        x = torch.from_numpy(np.stack([draw_scene(sc) for sc in scenes])).permute(0, 3, 1, 2).float() / 255
        if noise:
            x = (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        texts = [[p.text] + [q.text for q in hard_negatives(p, sc)] for p, sc in zip(prompts, scenes)]
        scores = score(x, texts)
        out[category] = sum(int(s.argmax() == 0) for s in scores) / per_category
    return out
