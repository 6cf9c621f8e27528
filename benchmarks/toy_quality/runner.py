"""Running the quality benchmark: the prompt sets, which toy models are there, the judging CLIP, one
``generate`` call per (variant, prompt, seed) judged by the rule, the true scenes' reference scores, and
the environment and JSON helpers the benchmarks share."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from toyworld.variants import Variant, composed_text

DEFAULT_PER_CATEGORY, DEFAULT_SEEDS = 16, 1      # the benchmark set: 80 images per variant
SEED_BASES = {"benchmark": 0, "tuning": 100}    # generation seeds of each prompt set


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def benchmark_prompts(prompt_set: str = "benchmark", per_category: int = DEFAULT_PER_CATEGORY,
                      categories: Sequence[str] | None = None):
    """The fixed prompts of ``prompt_set`` (``toyworld.prompts.prompt_set``), optionally of some categories only."""
    from toyworld.prompts import CATEGORIES
    from toyworld.prompts import prompt_set as world_prompt_set

    if per_category < 1:
        raise ValueError(f"--per-category is {per_category}; give at least 1")
    unknown = sorted(set(categories or ()) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {list(CATEGORIES)}")
    return [p for p in world_prompt_set(prompt_set_name(prompt_set), per_category) if not categories or p.category in categories]


def prompt_set_name(name: str) -> str:
    if name not in SEED_BASES:
        raise ValueError(f"unknown prompt set {name!r}; choose from {sorted(SEED_BASES)}")
    return name


# ---------------------------------------------------------------------------------------------
# Models and availability
# ---------------------------------------------------------------------------------------------

def missing_toy_models(names: Sequence[str]) -> dict[str, str]:
    """{toy model name: why it cannot be used} for those of *names* whose folder is incomplete."""
    from toyworld.paths import weights_dir

    out = {}
    for name in dict.fromkeys(names):
        try:
            weights_dir(name, check=True)
        except FileNotFoundError as err:
            out[name] = str(err)
    return out


def load_judge_clip(model: str | os.PathLike | None, *, device: str = "auto"):
    """The judging CLIP as a ``guidance.score.ScoreModel`` (loaded once), or ``None`` without one."""
    if model is None:
        return None
    from guidance.score import ScoreModel

    return ScoreModel.load(str(model), device=device)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def variant_options(variant: Variant, *, iterations: int | None, steps: int | None,
                    clip_guidance_scale: float | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword options for ``generate`` that make *variant* (iterations/steps only for its backend)."""
    from dataclasses import fields

    from generators import get_generator_class

    opts = dict(variant.options)
    from generators.runs.settings import RUN_NAMES

    owned = {f.name for f in fields(get_generator_class(variant.backend).Settings)}
    opts.update({k: v for k, v in (extra or {}).items() if k in owned or k in RUN_NAMES})
    if "iterations" in owned and iterations is not None:
        opts["iterations"] = iterations
    if variant.backend == "sd":
        if steps is not None:
            opts["steps"] = steps
        # (each guider's scale means something different: --clip-guidance-scale sets the clip guider's only)
        if clip_guidance_scale is not None and opts.get("clip_guidance_scale", None) != 0.0 and "guider" not in opts:
            opts["clip_guidance_scale"] = clip_guidance_scale
    return opts


def run_benchmark(prompts: Sequence, seeds: Sequence[int], variants: Sequence[Variant], *,
                  preset: str | None = "toy", options: dict[str, Any] | None = None, judge_clip=None,
                  iterations: int | None = None, steps: int | None = None,
                  clip_guidance_scale: float | None = None, threads: int | None = 1, device: str = "auto",
                  on_row: Callable[[dict], None] | None = None, log: Callable[[str], None] = print,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate, judge and score every (variant, prompt, seed); returns ``{"rows", "interrupted"}``.

    *options* go to every ``generate`` call (e.g. model folders when *preset* is ``None``);
    *judge_clip* is a ``ScoreModel`` (or ``None``: no CLIP score).
    """
    import torch

    from generators.runs import generate
    from guidance.score import clip_score
    from toyworld.rule import matches, read_images

    rows: list[dict] = []
    total = len(variants) * len(prompts) * len(seeds)
    for variant in variants:
        opts = {**(options or {}), **variant_options(variant, iterations=iterations, steps=steps,
                                                      clip_guidance_scale=clip_guidance_scale, extra=extra)}
        for p in prompts:
            for seed in seeds:
                t0 = time.perf_counter()
                text = composed_text(p) if variant.composed_prompt else p.text
                run = generate(text, backend=variant.backend, preset=preset, seed=int(seed), save=False,
                               progress=False, eval_model="none", threads=threads, device=device, **opts)
                wall = time.perf_counter() - t0
                images = run.images
                reading = read_images(images)[0]
                correct = matches(p, reading.background, reading.objects)
                score = None
                if judge_clip is not None:
                    score = float(clip_score(images, p.text, model=judge_clip, reduction="none")[0])
                timings = run.metadata.get("timings", {})
                losses = [x for x in run.losses if x is not None]
                row = {
                    "variant": variant.name, "backend": variant.backend, "prompt": p.text,
                    "category": p.category, "seed": int(seed), "correct": bool(correct),
                    "found": {"background": reading.background,
                              "objects": [[o.colour, o.shape, list(o.box)] for o in reading.objects]},
                    "clip_score": _round(score), "seconds": round(wall, 3),
                    "load_s": timings.get("load_s"), "generate_s": timings.get("generate_s"),
                    "steps_done": run.metadata.get("steps_done"),
                    "precision": run.metadata.get("precision"),     # the dtype the models ran in
                    "first_loss": _round(losses[0]) if losses else None,
                    "final_loss": _round(losses[-1]) if losses else None,
                    "interrupted": bool(run.interrupted),
                    "settings": {k: run.metadata["backend_settings"].get(k) for k in
                                 ("iterations", "steps", "scheduler", "clip_guidance_scale", "cfg_scale",
                                  "learning_rate", "width", "height") if k in run.metadata["backend_settings"]},
                }
                rows.append(row)
                found = ", ".join(f"{o.colour} {o.shape}" for o in reading.objects) or "nothing"
                log(f"[{len(rows)}/{total}] {variant.name:<11} seed {seed} {p.text!r}: "
                    f"{'right' if correct else f'wrong (found {found} on {reading.background})'}; "
                    f"clip_b {'-' if score is None else f'{score:.1f}'}; {wall:.1f}s")
                if on_row is not None:
                    on_row(row)
                if run.interrupted:  # Ctrl-C: keep what we have
                    log("interrupted: stopping; the rows so far are kept")
                    return {"rows": rows, "interrupted": True}
                del images, run
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return {"rows": rows, "interrupted": False}


def reference_scores(prompts: Sequence, judge_clip, *, seed: int = 0) -> dict[str, Any]:
    """The rule's verdict and the judging-CLIP score of true world scenes of the same prompts (the ceiling)."""
    import numpy as np
    import torch

    from guidance.score import clip_score
    from toyworld.rule import category_scores, judge
    from toyworld.scenes import draw_scene, scene_for

    rng = np.random.default_rng(seed)
    images = torch.from_numpy(np.stack([draw_scene(scene_for(p, rng)) for p in prompts])).permute(0, 3, 1, 2).float() / 255
    out: dict[str, Any] = {"n": len(prompts), "scores": category_scores(prompts, judge(images, prompts)), "clip_score": None}
    if judge_clip is not None:
        scores = clip_score(images, [p.text for p in prompts], model=judge_clip, reduction="none")
        out["clip_score"] = _round(float(scores.double().mean()))
    return out


# ---------------------------------------------------------------------------------------------
# Environment and JSON
# ---------------------------------------------------------------------------------------------

def _environment(threads: int | None) -> dict[str, Any]:
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(), "threads": threads,
            "load_average": [round(x, 2) for x in load] if load else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def start_analysis(script: str, json_path: Path, threads: int, argv=None) -> dict[str, Any] | None:
    """The start of an analysis script of ``benchmarks/`` (``search_headroom.py``, ``layout_attention.py``): ``None``
    (and a one-line error) when *json_path* exists, else quiet model loading, *threads* torch threads, and the
    report's first key, the command that made it."""
    import shlex
    import sys

    import torch

    if json_path.exists():
        print(f"error: {json_path} already exists; give a new --json file", file=sys.stderr)
        return None
    _quiet_loading()
    torch.set_num_threads(threads)
    return {"command": shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])}


def _quiet_loading() -> None:
    """No per-model 'Loading weights' progress bars from transformers/diffusers (one line per image here)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from diffusers.utils import logging as df_logging

        df_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
