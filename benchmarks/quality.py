"""Quality of each generator on toy world v3, the compositional benchmark (``shared/TOYWORLD.md``).

Headline: per-category accuracy (single, two_object, counting, colour_attr, position) judged by the
world's rule (``toyworld.rule``), overall = the mean of the five (GenEval's overall), each with a 95%
interval, against seconds per image at one thread. Two prompt sets are kept apart:

- the BENCHMARK set (default, ``--prompt-set benchmark``, generation seeds from 0): figures are reported
  on it and it is never used to choose settings;
- the TUNING set (``--prompt-set tuning``, generation seeds from 100): settings are chosen on it only
  (``--set KEY=VALUE`` tries an option on every variant that has it).

Every variant below generates one image per (prompt, seed) through the public API
(``generators.runs.generate(..., preset="toy")``: CLIPs ``clip_a``, ``clip_c``, ``clip_d`` guide). Each image
is judged by the rule against its prompt and scored by the *judging* toy CLIP ``clip_b`` (torchmetrics
definition ``100*cos``). The same seeds are used for every variant, so SD with and without guidance
start from the same noise.

    python benchmarks/quality.py                                  # benchmark set: 16 prompts per category x 1 seed
    python benchmarks/quality.py --prompt-set tuning --per-category 8       # the tuning set
    python benchmarks/quality.py --quick                          # 1 prompt per category, few iterations/steps
    python benchmarks/quality.py --variants sd sd+clip --categories position --per-category 16
    python benchmarks/quality.py --json benchmarks/results/q.json --overwrite

Results: a table on stdout, two pictures (overall accuracy vs seconds per image; per-category bars per
method) and JSON (``--json``, written after every image so an interrupted run keeps its rows). Variants
whose toy model folder is missing are skipped with a message, not an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "quality.json"


@dataclass(frozen=True)
class Variant:
    """One generator configuration: a backend and the options that make it this variant."""

    name: str
    label: str
    backend: str
    options: dict = field(default_factory=dict)
    models: tuple[str, ...] = ()  # toy model folders it needs (toyworld/weights/<name>)
    composed_prompt: bool = False  # the prompt's objects as separate parts (composable prompts)


# The variants compared. Add a row here for a new backend or configuration.
VARIANTS: tuple[Variant, ...] = (
    Variant("vqgan+clip", "VQGAN+CLIP", "vqgan", {}, ("clip_a", "clip_c", "clip_d", "vqgan")),
    Variant("sd", "SD, no CLIP guidance", "sd", {"clip_guidance_scale": 0.0}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+clip", "SD + CLIP guidance", "sd", {}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("pixels+clip", "RGB pixels + CLIP (no prior)", "pixels", {}, ("clip_a", "clip_c", "clip_d")),
    Variant("fft-pixels+clip", "Fourier pixels + CLIP (no prior)", "pixels", {"parameterisation": "fft"},
            ("clip_a", "clip_c", "clip_d")),
    Variant("sd+dps", "SD + DPS", "sd", {"guider": "dps", "clip_guidance_scale": 1.0}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+mpgd", "SD + MPGD", "sd", {"guider": "mpgd", "clip_guidance_scale": 50.0},
            ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+freedom", "SD + FreeDoM", "sd", {"guider": "freedom", "clip_guidance_scale": 0.5},
            ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+ugd", "SD + Universal Guidance (2 backward steps)", "sd",
            {"guider": "ugd", "backward_steps": 2, "backward_lr": 1.0}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("sd+tfg", "SD + TFG", "sd", {"guider": "tfg", "clip_guidance_scale": 5.0, "backward_steps": 2,
                                          "backward_lr": 10.0, "backward_schedule": "decreasing"},
            ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("noise+clip", "noise optimisation + CLIP (ReNO)", "noise", {}, ("clip_a", "clip_c", "clip_d", "sd")),
    Variant("best-of-n+clip", "best-of-N noises, same renderer calls", "noise", {"method": "best-of-n"},
            ("clip_a", "clip_c", "clip_d", "sd")),
)
_SD = ("clip_a", "clip_c", "clip_d", "sd")
VARIANTS += (
    Variant("sd+ae", "SD + Attend-and-Excite", "sd", {"clip_guidance_scale": 0.0, "attend_excite": True}, _SD),
    Variant("sd+layout", "SD + layout guidance (boxes from the prompt)", "sd",
            {"clip_guidance_scale": 0.0, "layout": "auto"}, _SD),
    Variant("sd+ae+layout", "SD + Attend-and-Excite + layout guidance", "sd",
            {"clip_guidance_scale": 0.0, "attend_excite": True, "layout": "auto"}, _SD),
    Variant("sd+composable", "SD, composable prompts (a part per object)", "sd",
            {"clip_guidance_scale": 0.0, "composable": True}, _SD, composed_prompt=True),
    Variant("noise+itm", "noise optimisation + toy ITM reward (ReNO)", "noise", {"rewards": ["itm:toy=1"]},
            _SD + ("itm",)),
    Variant("best-of-n+itm", "best-of-N noises, toy ITM verifier", "noise",
            {"method": "best-of-n", "rewards": ["itm:toy=1"]}, _SD + ("itm",)),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


def composed_text(prompt) -> str:
    """A two-object world prompt as one part per object, each on the background, joined by `` AND ``
    (A1111's composable syntax); other prompts unchanged."""
    from toyworld.prompts import articles

    if prompt.category not in ("two_object", "colour_attr"):
        return prompt.text
    return " AND ".join(articles(f"a {colour + ' ' if colour else ''}{shape} on a {prompt.background} background")
                        for colour, shape in prompt.objects)

QUICK = {"per_category": 1, "seeds": 1, "iterations": 30, "steps": 10}
DEFAULT_PER_CATEGORY, DEFAULT_SEEDS = 16, 1      # the benchmark set: 80 images per variant
SEED_BASES = {"benchmark": 0, "tuning": 100}    # generation seeds of each prompt set
# issue 33's target: the best method reaches this overall accuracy with every category at least CATEGORY_FLOOR
OVERALL_TARGET, CATEGORY_FLOOR = 0.90, 0.75
DEFAULT_FIGURE = ROOT / "benchmarks" / "results" / "quality_vs_time.png"
DEFAULT_BARS = ROOT / "benchmarks" / "results" / "quality_by_category.png"


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (the judging rule's module computes it with scipy)."""
    from toyworld.rule import wilson

    return (0.0, 1.0) if n == 0 else wilson(successes, n)


def overall_interval(categories: dict[str, dict]) -> tuple[float, float]:
    """A 95% interval of the overall accuracy: the means of the categories' Wilson bounds (conservative:
    at least as wide as the interval of the mean, and never empty at 0% or 100%)."""
    if not categories:
        return (0.0, 1.0)
    cis = [wilson_interval(c["right"], c["n"]) for c in categories.values()]
    return (sum(lo for lo, _ in cis) / len(cis), sum(hi for _, hi in cis) / len(cis))


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
# Summaries and targets
# ---------------------------------------------------------------------------------------------

def summarise(rows: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per variant: per-category accuracy with 95% intervals, overall (mean of the categories) with its
    interval, mean judging-CLIP score and times."""
    from toyworld.prompts import CATEGORIES

    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        n = len(mine)
        cats = {}
        for c in CATEGORIES:
            rs = [r for r in mine if r["category"] == c]
            if rs:
                k = sum(r["correct"] for r in rs)
                cats[c] = {"n": len(rs), "right": k, "accuracy": round(k / len(rs), 4),
                           "ci95": [round(x, 4) for x in wilson_interval(k, len(rs))]}
        overall = sum(c["accuracy"] for c in cats.values()) / len(cats)
        scores = [r["clip_score"] for r in mine if r["clip_score"] is not None]
        seconds = sum(r["seconds"] for r in mine)
        gen = [r["generate_s"] for r in mine if r["generate_s"] is not None]
        load = [r["load_s"] for r in mine if r["load_s"] is not None]
        out[name] = {
            "n": n,
            "categories": cats,
            "overall": round(overall, 4),
            "overall_ci95": [round(x, 4) for x in overall_interval(cats)],
            "clip_score": round(statistics.fmean(scores), 3) if scores else None,
            "seconds_total": round(seconds, 2),
            "seconds_per_image": round(seconds / n, 3),
            "generate_seconds_per_image": round(statistics.fmean(gen), 3) if gen else None,
            "load_seconds_total": round(sum(load), 2) if load else None,
            "settings": mine[0]["settings"],
        }
    return out


def check_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 33's headline target, with the measured value and ``met`` (``None`` when nothing was run)."""
    text = (f"the best method reaches >= {OVERALL_TARGET:.0%} overall with every category >= {CATEGORY_FLOOR:.0%}")
    if not summary:
        return [{"target": text, "measured": None, "met": None}]
    best = max(summary, key=lambda k: summary[k]["overall"])
    s = summary[best]
    worst = min(s["categories"], key=lambda c: s["categories"][c]["accuracy"])
    met = s["overall"] >= OVERALL_TARGET - 1e-9 and s["categories"][worst]["accuracy"] >= CATEGORY_FLOOR - 1e-9
    return [{"target": text, "measured": f"{best}: overall {s['overall']:.1%}, weakest {worst} "
                                         f"{s['categories'][worst]['accuracy']:.1%}", "met": met}]


def lifts(summary: dict[str, dict[str, Any]], baseline: str = "sd") -> dict[str, dict[str, float]]:
    """Per variant and category, accuracy minus the baseline's (unguided SD), in points."""
    if baseline not in summary:
        return {}
    base = summary[baseline]["categories"]
    return {name: {c: round(100 * (v["accuracy"] - base[c]["accuracy"]), 1) for c, v in s["categories"].items() if c in base}
            for name, s in summary.items() if name != baseline}


def format_table(summary: dict[str, dict[str, Any]], reference: dict[str, Any] | None = None) -> str:
    """The per-variant summary as a plain-text table (accuracy per category, overall with its interval)."""
    from toyworld.prompts import CATEGORIES

    labels = {v.name: v.label for v in VARIANTS}
    head = (f"{'variant':<40} {'n':>3} " + " ".join(f"{c[:9]:>9}" for c in CATEGORIES)
            + f" {'overall':>8} {'95% CI':>11} {'clip_b':>7} {'s/img':>7}")
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        cells = " ".join(f"{s['categories'][c]['accuracy']:9.1%}" if c in s["categories"] else f"{'-':>9}"
                         for c in CATEGORIES)
        low, high = s["overall_ci95"]
        score = "-" if s["clip_score"] is None else f"{s['clip_score']:.2f}"
        lines.append(f"{labels.get(name, name):<40} {s['n']:>3} {cells} {s['overall']:8.1%} "
                     f"{f'{low:.0%}-{high:.0%}':>11} {score:>7} {s['seconds_per_image']:>7.2f}")
    if reference is not None:
        r = reference["scores"]
        cells = " ".join(f"{r[c]['accuracy']:9.1%}" if c in r else f"{'-':>9}" for c in CATEGORIES)
        score = "-" if reference["clip_score"] is None else f"{reference['clip_score']:.2f}"
        lines.append(f"{'(true world scenes)':<40} {reference['n']:>3} {cells} {r['overall']:8.1%} {'':>11} {score:>7}")
    return "\n".join(lines)


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    mark = {True: "MET    ", False: "NOT MET", None: "not run"}
    return "\n".join(f"[{mark[t['met']]}] {t['target']}: {t['measured'] or 'not measured'}" for t in targets)


PLOT_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
               (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127), (0, 0, 128), (0, 128, 96),
               (230, 171, 2), (102, 0, 51)]


def _canvas(size):
    """A white PIL image of *size*, its drawing context and the default font at 13 px."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, (255, 255, 255))
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    return image, ImageDraw.Draw(image), font


def quality_vs_time_figure(summary: dict[str, dict[str, Any]], *, title: str = "", size=(1000, 500)):
    """Overall accuracy (the mean of the five categories) against seconds per image (log scale), one point
    per variant with its 95% interval as a vertical bar. PIL only."""
    width, height = size
    left, right, top, bottom = 70, 400, 40, 60
    image, draw, font = _canvas(size)
    points = [(name, s) for name, s in summary.items() if s.get("seconds_per_image")]
    secs = [s["seconds_per_image"] for _, s in points] or [1.0]
    lo_t, hi_t = math.log10(min(secs) / 1.5), math.log10(max(secs) * 1.5)
    if hi_t - lo_t < 1:
        mid = (hi_t + lo_t) / 2
        lo_t, hi_t = mid - 0.5, mid + 0.5

    def xy(seconds: float, share: float) -> tuple[float, float]:
        x = left + (math.log10(seconds) - lo_t) / (hi_t - lo_t) * (width - left - right)
        return x, top + (1 - share) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline=(30, 30, 30))
    for share in (0, 0.25, 0.5, 0.75, 1.0):
        x0, y = xy(10 ** lo_t, share)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{share:.0%}", fill=(30, 30, 30), font=font, anchor="rm")
    for exponent in range(math.floor(lo_t), math.ceil(hi_t) + 1):
        for mult in (1, 2, 5):
            seconds = mult * 10 ** exponent
            if lo_t <= math.log10(seconds) <= hi_t:
                x, _ = xy(seconds, 0)
                draw.line([x, height - bottom, x, height - bottom + 4], fill=(30, 30, 30))
                draw.text((x, height - bottom + 6), f"{seconds:g}", fill=(30, 30, 30), font=font, anchor="mt")
    draw.text(((left + width - right) / 2, height - 30), "seconds per image (1 CPU thread, log scale)",
              fill=(30, 30, 30), font=font, anchor="mm")
    draw.text((12, top - 22), "overall accuracy (mean of the five categories, judged by the rule)", fill=(30, 30, 30), font=font)
    if title:
        draw.text((width - 12, height - 4), title, fill=(120, 120, 120), font=font, anchor="rs")

    def marker(x: float, y: float, k: int, colour) -> None:    # circle, square, diamond: told apart in grey too
        box = [x - 5, y - 5, x + 5, y + 5]
        if k % 3 == 0:
            draw.ellipse(box, fill=colour)
        elif k % 3 == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)], fill=colour)

    labels = {v.name: v.label for v in VARIANTS}
    for k, (name, s) in enumerate(points):
        colour = PLOT_COLOURS[k % len(PLOT_COLOURS)]
        x, y = xy(s["seconds_per_image"], s["overall"])
        low, high = s.get("overall_ci95") or (s["overall"],) * 2
        _, y_low = xy(s["seconds_per_image"], low)
        _, y_high = xy(s["seconds_per_image"], high)
        draw.line([x, y_low, x, y_high], fill=colour, width=2)
        for yy in (y_low, y_high):
            draw.line([x - 4, yy, x + 4, yy], fill=colour, width=2)
        marker(x, y, k, colour)
        ly = top + 10 + 20 * k
        marker(width - right + 19, ly, k, colour)
        draw.text((width - right + 30, ly), f"{labels.get(name, name)} ({s['overall']:.0%})",
                  fill=(30, 30, 30), font=font, anchor="lm")
    return image


def category_bars_figure(summary: dict[str, dict[str, Any]], *, title: str = "", size=(1100, 460)):
    """Per-category accuracy of each variant as grouped bars (one group per category, then overall), with
    the 95% intervals as whiskers. PIL only."""
    from toyworld.prompts import CATEGORIES

    width, height = size
    left, right, top, bottom = 60, 330, 40, 50
    image, draw, font = _canvas(size)
    groups = [*CATEGORIES, "overall"]
    names = list(summary)
    plot_w, plot_h = width - left - right, height - top - bottom

    def y_of(share: float) -> float:
        return top + (1 - share) * plot_h

    draw.rectangle([left, top, width - right, height - bottom], outline=(30, 30, 30))
    for share in (0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(share)
        draw.line([left, y, width - right, y], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{share:.0%}", fill=(30, 30, 30), font=font, anchor="rm")
    group_w = plot_w / len(groups)
    bar_w = max(2.0, (group_w - 12) / max(len(names), 1))
    for g, group in enumerate(groups):
        x0 = left + g * group_w + 6
        draw.text((x0 + (group_w - 12) / 2, height - bottom + 8), group, fill=(30, 30, 30), font=font, anchor="mt")
        for k, name in enumerate(names):
            s = summary[name]
            if group == "overall":
                value, (low, high) = s["overall"], s["overall_ci95"]
            elif group in s["categories"]:
                c = s["categories"][group]
                value, (low, high) = c["accuracy"], c["ci95"]
            else:
                continue
            colour = PLOT_COLOURS[k % len(PLOT_COLOURS)]
            xa = x0 + k * bar_w
            draw.rectangle([xa, y_of(value), xa + bar_w - 1, y_of(0)], fill=colour)
            xm = xa + bar_w / 2
            draw.line([xm, y_of(low), xm, y_of(high)], fill=(60, 60, 60), width=1)
    labels = {v.name: v.label for v in VARIANTS}
    for k, name in enumerate(names):
        ly = top + 10 + 20 * k
        draw.rectangle([width - right + 14, ly - 5, width - right + 24, ly + 5], fill=PLOT_COLOURS[k % len(PLOT_COLOURS)])
        draw.text((width - right + 30, ly), f"{labels.get(name, name)} ({summary[name]['overall']:.0%})",
                  fill=(30, 30, 30), font=font, anchor="lm")
    draw.text((12, top - 22), "accuracy per category (judged by the rule; whiskers: 95% intervals)", fill=(30, 30, 30), font=font)
    if title:
        draw.text((width - 12, height - 4), title, fill=(120, 120, 120), font=font, anchor="rs")
    return image


def save_figures(summary: dict, figure: Path, bars: Path, title: str) -> None:
    """Write both pictures (either path may be 'none')."""
    for path, make in ((figure, quality_vs_time_figure), (bars, category_bars_figure)):
        if str(path).lower() != "none" and summary:
            path.parent.mkdir(parents=True, exist_ok=True)
            make(summary, title=title).save(path)
            print(f"figure: {path}")


# ---------------------------------------------------------------------------------------------
# Command line
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from toyworld.prompts import CATEGORIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-set", default="benchmark", choices=sorted(SEED_BASES),
                        help="benchmark (report figures) or tuning (choose settings); default benchmark")
    parser.add_argument("--per-category", type=int, default=None, metavar="N",
                        help=f"prompts per category (default {DEFAULT_PER_CATEGORY})")
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, metavar="NAME",
                        help=f"only these categories ({', '.join(CATEGORIES)}; default all)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"generation seeds per prompt (default {DEFAULT_SEEDS}); they start at --seed-base")
    parser.add_argument("--seed-base", type=int, default=None, metavar="N",
                        help="first generation seed (default: 0 on the benchmark set, 100 on the tuning set)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANT_NAMES), choices=VARIANT_NAMES,
                        metavar="NAME", help=f"variants to run: {', '.join(VARIANT_NAMES)} (default: all)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="optimisation steps of the latent-optimisation variants (default: the toy preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                        help="an extra generate() option for every variant that has it (repeatable; for tuning "
                             "on the tuning prompt set, e.g. --set learning_rate=0.1)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="Stable Diffusion denoising steps (default: the sd backend's)")
    parser.add_argument("--clip-guidance-scale", type=float, default=None,
                        help="CLIP guidance scale of the sd+clip variant (default: the sd backend's)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a quick run: {QUICK['per_category']} prompt per category x {QUICK['seeds']} seed, "
                             f"{QUICK['iterations']} iterations / {QUICK['steps']} steps (explicit options win)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default 1: fastest for the toy models on a shared machine)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="FILE",
                        help="write results here (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="do not generate: combine the rows of earlier runs' JSON files (e.g. variants run as "
                             "parallel processes on the same prompt set) into one table, targets and pictures")
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, metavar="PNG",
                        help="the overall-accuracy-vs-time picture (default: %(default)s; the README's is "
                             "docs/images/quality_vs_time.png); 'none' for no picture")
    parser.add_argument("--bars", type=Path, default=DEFAULT_BARS, metavar="PNG",
                        help="the per-category bars picture (default: %(default)s; the README's is "
                             "docs/images/quality_by_category.png); 'none' for no picture")
    args = parser.parse_args(argv)
    for key in ("per_category", "seeds", "iterations", "steps"):
        if getattr(args, key) is None and args.quick:
            setattr(args, key, QUICK[key])
    args.per_category = DEFAULT_PER_CATEGORY if args.per_category is None else args.per_category
    args.seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    args.seed_base = SEED_BASES[args.prompt_set] if args.seed_base is None else args.seed_base
    extra = {}
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set {item!r}: write KEY=VALUE, e.g. --set learning_rate=0.1")
        extra[key.strip().replace("-", "_")] = value
    args.extra = extra
    for key in ("per_category", "seeds", "iterations", "steps", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} is {value}; give at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    threads_before = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads_before)


def merge_reports(paths: Sequence[Path]) -> dict[str, Any]:
    """One report from several runs' JSON files; they must share the prompt set and seeds."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for path, r in zip(paths, reports):
        if r["prompts"] != first["prompts"] or r["seeds"] != first["seeds"]:
            raise ValueError(f"{path} was run on other prompts or seeds than {paths[0]}; merge only runs of one set")
    rows = [row for r in reports for row in r["rows"]]
    summary = summarise(rows)
    return {"merged_from": [str(p) for p in paths], "commands": [r.get("command") for r in reports],
            "complete": all(r.get("complete") for r in reports), "prompt_set": first.get("prompt_set"),
            "prompts": first["prompts"], "seeds": first["seeds"], "reference": first.get("reference"), "rows": rows,
            "summary": summary, "lifts_over_unguided_sd": lifts(summary), "targets": check_targets(summary)}


def _print_report(report: dict, command: str | None = None) -> None:
    n = len(report["prompts"])
    print(f"\nToy world v3, {report.get('prompt_set')} set: {n} prompts x {len(report['seeds'])} seeds; judged by "
          "toyworld.rule (shared/TOYWORLD.md); clip_b: torchmetrics CLIP score under the judging toy CLIP")
    if command:
        print(f"command: {command}")
    print(format_table(report["summary"], report.get("reference")))
    if report.get("lifts_over_unguided_sd"):
        print("\nPoints over unguided SD, per category:")
        for name, d in report["lifts_over_unguided_sd"].items():
            print(f"  {name:<16} " + "  ".join(f"{c} {v:+.1f}" for c, v in d.items()))
    print("\nTargets:")
    print(format_targets(report["targets"]))


def _title(report: dict) -> str:
    return (f"toy world v3, {report.get('prompt_set')} set, {len(report['prompts'])} prompts x {len(report['seeds'])} "
            "seeds; 95% intervals")


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.json.exists() and not args.overwrite:
        print(f"error: {args.json} already exists; pass --overwrite to replace it or --json NEW_FILE", file=sys.stderr)
        return 2
    if args.merge:
        try:
            report = merge_reports(args.merge)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        _write_json(args.json, report)
        _print_report(report)
        save_figures(report["summary"], args.figure, args.bars, _title(report))
        return 0
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        prompts = benchmark_prompts(args.prompt_set, args.per_category, args.categories)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seeds = [args.seed_base + i for i in range(args.seeds)]
    chosen = [v for v in VARIANTS if v.name in args.variants]

    # Which variants can run: their toy model folders must be complete.
    skipped: dict[str, str] = {}
    missing = missing_toy_models([m for v in chosen for m in v.models] + ["clip_b"])
    variants = []
    for v in chosen:
        gone = [m for m in v.models if m in missing]
        if gone:
            skipped[v.name] = "; ".join(missing[m] for m in gone)
            print(f"skipping {v.name}: {skipped[v.name]}", file=sys.stderr)
        else:
            variants.append(v)
    import torch

    _quiet_loading()
    torch.set_num_threads(args.threads)
    judge_note = None
    judge_clip = None
    t_judge = time.perf_counter()
    if "clip_b" in missing:
        judge_note = missing["clip_b"]
        print(f"no CLIP scores: {judge_note}", file=sys.stderr)
    else:
        from toyworld.paths import weights_dir

        judge_clip = load_judge_clip(weights_dir("clip_b"), device=args.device)
    judge_load_s = time.perf_counter() - t_judge

    print(f"{len(prompts)} prompts x {len(seeds)} seeds x {len(variants)} variants "
          f"({', '.join(v.name for v in variants) or 'none'}); results -> {args.json}", file=sys.stderr)
    report: dict[str, Any] = {
        "command": command, "complete": False, "environment": _environment(args.threads),
        "prompt_set": args.prompt_set, "prompts": [p.text for p in prompts], "seeds": seeds,
        "variants": {v.name: {"label": v.label, "backend": v.backend, "options": v.options} for v in chosen},
        "overrides": {"iterations": args.iterations, "steps": args.steps,
                      "clip_guidance_scale": args.clip_guidance_scale, "extra": args.extra},
        "judge": "toyworld.rule (shared/TOYWORLD.md)",
        "judge_clip": None if judge_clip is None else str(judge_clip.name), "judge_clip_note": judge_note,
        "judge_clip_load_s": round(judge_load_s, 3),
        "clip_score_definition": "torchmetrics per image (100*cos with the judging CLIP clip_b); mean over images",
        "overall_definition": "mean of the category accuracies; its 95% interval: the means of the categories' Wilson bounds",
        "skipped": skipped, "reference": reference_scores(prompts, judge_clip), "summary": {}, "targets": [], "rows": [],
    }
    rows: list[dict] = report["rows"]

    def on_row(row: dict) -> None:
        rows.append(row)
        report["summary"] = summarise(rows)
        _write_json(args.json, report)

    t0 = time.perf_counter()
    try:
        result = run_benchmark(prompts, seeds, variants, judge_clip=judge_clip, iterations=args.iterations,
                               steps=args.steps, clip_guidance_scale=args.clip_guidance_scale,
                               threads=args.threads, device=args.device, on_row=on_row,
                               log=lambda s: print(s, file=sys.stderr), extra=args.extra)
        interrupted = result["interrupted"]
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the rows so far are kept", file=sys.stderr)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        report["error"] = str(err)
        _write_json(args.json, report)
        return 2
    report["seconds_total"] = round(time.perf_counter() - t0, 2)
    report["summary"] = summarise(rows)
    report["lifts_over_unguided_sd"] = lifts(report["summary"])
    report["targets"] = check_targets(report["summary"])
    report["complete"] = not interrupted
    _write_json(args.json, report)
    _print_report(report, command)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    save_figures(report["summary"], args.figure, args.bars, _title(report))
    print(f"\ntotal {report['seconds_total']:.1f}s; JSON: {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
