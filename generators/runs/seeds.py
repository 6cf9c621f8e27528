"""A seed per image: ``seeds=`` / ``--seeds`` with one prompt (one run, an image per seed), and the run that
makes each image alone from its own seed, so that image *i* equals a one-image run of ``seeds[i]``."""

from __future__ import annotations

from typing import Any

import torch

from ..base import GenerationResult
from .batch import parse_seeds
from .progress import Progress


def use_seeds(seeds: Any, opts: dict[str, Any], provenance: dict) -> None:
    """``seeds=``: one image per seed (``opts`` seed and num_images set to match; each image's seed recorded)."""
    sources = provenance["sources"]
    seed_list = parse_seeds(seeds)
    if sources.get("seed") == "arguments":
        raise ValueError("give --seeds (a seed per image) or --seed, not both")
    if "num_images" not in opts and len(seed_list) > 1:
        raise ValueError("this backend makes one image a run; give one seed with --seed")
    if sources.get("num_images") == "arguments" and opts["num_images"] != len(seed_list):
        raise ValueError(f"--num-images {opts['num_images']} and --seeds ({len(seed_list)} seeds) disagree; "
                         "give --seeds alone")
    opts["seed"], sources["seed"] = seed_list[0], "arguments"
    if "num_images" in opts:
        opts["num_images"], sources["num_images"] = len(seed_list), "arguments"
    provenance["seeds"] = seed_list


def each_seed(prep, progress: Progress) -> GenerationResult:
    """Image *i* generated alone from ``prep.seeds[i]``, so that it equals a one-image run of that seed; the
    results joined (losses: the mean over images at each step). Ctrl-C or a callback stop ends the batch with
    the images made so far."""
    from dataclasses import replace

    whole = prep.generator.settings
    prep.generator.settings = replace(whole, num_images=1)
    progress.runs = len(prep.seeds)
    parts: list[GenerationResult] = []
    try:
        for i, seed in enumerate(prep.seeds):
            progress.image, progress.last = i, None
            try:
                part = prep.generator.generate(prep.objective, seed=seed, callback=progress)
            except KeyboardInterrupt:
                if progress.last is None and not parts:
                    raise
                if progress.last is not None:
                    parts.append(GenerationResult(images=progress.last.decode().float().cpu(), interrupted=True,
                                                  steps_done=progress.last.step + 1))
                else:
                    parts[-1].interrupted = True
                break
            parts.append(part)
            if part.interrupted or part.stopped_at is not None:
                break
    finally:
        prep.generator.settings = whole
    losses = [sum(step) / len(step) for step in zip(*(p.losses for p in parts))]
    return GenerationResult(images=torch.cat([p.images for p in parts]), losses=losses, info=dict(parts[0].info),
                            interrupted=any(p.interrupted for p in parts), steps_done=min(p.steps_done for p in parts),
                            stopped_at=next((p.stopped_at for p in parts if p.stopped_at is not None), None))
