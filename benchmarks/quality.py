"""Quality of each generator on the toy world: pixel-judge accuracy, judging-CLIP score and time.

Headline: the share of images with all three attributes (colour, shape, background) right, with its
95% Wilson interval, against seconds per image at one thread. Two prompt sets are kept apart:

- the BENCHMARK set (default, ``--prompt-seed 0``, generation seeds 0..3): figures are reported on it
  and it is never used to choose settings;
- the TUNING set (``--prompt-seed 7 --seed-base 10``): developers may look at it and choose settings on
  it (``--set KEY=VALUE`` tries an option on every variant that has it).

For a fixed, seeded sample of prompts "a {colour} {shape} on a {background} background" and a few
seeds, every variant below generates one image per (prompt, seed) through the public API
(``generators.run.generate(..., preset="toy")``: CLIPs ``clip_a``, ``clip_c``, ``clip_d`` guide). Each
image is judged by the pixel-level judge (``toyworld.judge``: colour / shape / background, all three) and scored by the
*judging* toy CLIP ``clip_b`` (``guidance.score``, torchmetrics definition ``100*cos``, model
loaded once). The same seeds are used for every variant, so SD with and without CLIP guidance
start from the same noise.

    python benchmarks/quality.py                          # benchmark set: 16 prompts x 4 seeds = 64 images/variant
    python benchmarks/quality.py --prompt-seed 7 --seed-base 10 --prompts 12 --seeds 2    # the tuning set
    python benchmarks/quality.py --quick                  # 2 prompts x 1 seed, few iterations/steps
    python benchmarks/quality.py --variants vqgan+clip --prompts 16 --seeds 3 --iterations 150
    python benchmarks/quality.py --json benchmarks/results/q.json --overwrite

Results: a table on stdout, and JSON (``--json``, default ``benchmarks/results/quality.json``,
written after every image so an interrupted run keeps its rows) with per-variant summaries,
per-image rows, the targets of issue 6 and whether each is met. Variants whose toy model folder is
missing (e.g. ``toyworld/weights/sd`` while it trains) are skipped with a message, not an error.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "quality.json"
ATTRIBUTES = ("colour", "shape", "background")


@dataclass(frozen=True)
class Variant:
    """One generator configuration: a backend and the options that make it this variant."""

    name: str
    label: str
    backend: str
    options: dict = field(default_factory=dict)
    models: tuple[str, ...] = ()  # toy model folders it needs (toyworld/weights/<name>)


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
VARIANT_NAMES = tuple(v.name for v in VARIANTS)

# Issue 6 targets.
VQGAN_TARGETS = {"colour": 0.90, "background": 0.90, "shape": 0.60}
SD_GUIDANCE_GAIN = 0.10  # SD+CLIP beats SD by this much on unguided SD's weakest attribute

QUICK = {"prompts": 2, "seeds": 1, "iterations": 30, "steps": 10}
DEFAULT_PROMPTS, DEFAULT_SEEDS = 16, 4         # the benchmark set: 64 images per variant
TUNING_PROMPT_SEED, TUNING_SEED_BASE = 7, 10   # the tuning set (settings are chosen only on this one)
GUIDER_GAIN = 0.30        # issue 19: the best guider beats today's clip rule on "all three" by this much
SD_ALL_THREE_GAIN = 0.20  # toy world v2: SD + CLIP guidance beats unguided SD on "all three" by this much
DEFAULT_FIGURE = ROOT / "benchmarks" / "results" / "quality_vs_time.png"


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def sample_prompts(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """*n* distinct (colour, shape, background != colour) prompts, a fixed function of *seed*,
    spread evenly over the shapes (round-robin over a shuffled shape order)."""
    import numpy as np

    from toyworld.world import SHAPES, all_full_captions

    combos = all_full_captions()  # (caption, colour, shape, background), background != colour
    if not 1 <= n <= len(combos):
        raise ValueError(f"--prompts is {n}; give 1 to {len(combos)} (the number of distinct toy prompts)")
    rng = np.random.default_rng(seed)
    order = [combos[i] for i in rng.permutation(len(combos))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    buckets = {s: [c for c in order if c[2] == s] for s in shapes}
    picked: list[dict[str, str]] = []
    for i in range(n):
        cap, colour, shape, background = buckets[shapes[i % len(shapes)]].pop(0)
        picked.append({"prompt": cap, "colour": colour, "shape": shape, "background": background})
    return picked


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
    from generators.settings import RUN_NAMES

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


def run_benchmark(prompts: Sequence[dict[str, str]], seeds: Sequence[int], variants: Sequence[Variant], *,
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

    from generators.run import generate
    from guidance.score import clip_score
    from toyworld.judge import judge_batch

    rows: list[dict] = []
    total = len(variants) * len(prompts) * len(seeds)
    for variant in variants:
        opts = {**(options or {}), **variant_options(variant, iterations=iterations, steps=steps,
                                                      clip_guidance_scale=clip_guidance_scale, extra=extra)}
        for p in prompts:
            for seed in seeds:
                t0 = time.perf_counter()
                run = generate(p["prompt"], backend=variant.backend, preset=preset, seed=int(seed), save=False,
                               progress=False, eval_model="none", threads=threads, device=device, **opts)
                wall = time.perf_counter() - t0
                images = run.images
                verdict = judge_batch(images)[0]
                score = None
                if judge_clip is not None:
                    score = float(clip_score(images, p["prompt"], model=judge_clip, reduction="none")[0])
                correct = {a: getattr(verdict, a) == p[a] for a in ATTRIBUTES}
                correct["all"] = all(correct.values())
                timings = run.metadata.get("timings", {})
                losses = [x for x in run.losses if x is not None]
                row = {
                    "variant": variant.name, "backend": variant.backend, "prompt": p["prompt"],
                    "target": {a: p[a] for a in ATTRIBUTES}, "seed": int(seed),
                    "judged": verdict.as_dict(), "correct": correct,
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
                marks = " ".join(f"{a}={'ok' if correct[a] else getattr(verdict, a)}" for a in ATTRIBUTES)
                log(f"[{len(rows)}/{total}] {variant.name:<11} seed {seed} {p['prompt']!r}: {marks}; "
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


def reference_scores(prompts: Sequence[dict[str, str]], judge_clip, *, seed: int = 0) -> dict[str, Any]:
    """Judge accuracy and judging-CLIP score of true world images of the same prompts (the ceiling)."""
    import numpy as np
    import torch

    from guidance.score import clip_score
    from toyworld.judge import accuracy, judge_batch
    from toyworld.world import SIZE_RANGE, render

    rng = np.random.default_rng(seed)
    n = len(prompts)
    sizes = rng.uniform(*SIZE_RANGE, n)
    centers = sizes[:, None] / 2 + rng.uniform(0, 1, (n, 2)) * (1 - sizes[:, None])
    arr = render([p["shape"] for p in prompts], [p["colour"] for p in prompts],
                 [p["background"] for p in prompts], sizes, centers)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    acc = accuracy(judge_batch(images), [p["colour"] for p in prompts], [p["shape"] for p in prompts],
                   [p["background"] for p in prompts])
    out: dict[str, Any] = {"n": n, "accuracy": {k: round(v, 4) for k, v in acc.items()}, "clip_score": None}
    if judge_clip is not None:
        scores = clip_score(images, [p["prompt"] for p in prompts], model=judge_clip, reduction="none")
        out["clip_score"] = _round(float(scores.double().mean()))
    return out


# ---------------------------------------------------------------------------------------------
# Summaries and targets
# ---------------------------------------------------------------------------------------------

def summarise(rows: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per-variant accuracy (colour/shape/background/all), mean judging-CLIP score and times."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        n = len(mine)
        acc = {a: round(sum(r["correct"][a] for r in mine) / n, 4) for a in (*ATTRIBUTES, "all")}
        low, high = wilson_interval(sum(r["correct"]["all"] for r in mine), n)
        scores = [r["clip_score"] for r in mine if r["clip_score"] is not None]
        seconds = sum(r["seconds"] for r in mine)
        gen = [r["generate_s"] for r in mine if r["generate_s"] is not None]
        load = [r["load_s"] for r in mine if r["load_s"] is not None]
        out[name] = {
            "n": n,
            "accuracy": acc,
            "all_three_ci95": [round(low, 4), round(high, 4)],
            "clip_score": round(statistics.fmean(scores), 3) if scores else None,
            "clip_score_std": round(statistics.stdev(scores), 3) if len(scores) > 1 else None,
            "seconds_total": round(seconds, 2),
            "seconds_per_image": round(seconds / n, 3),
            "generate_seconds_per_image": round(statistics.fmean(gen), 3) if gen else None,
            "load_seconds_total": round(sum(load), 2) if load else None,
            "load_seconds_first": round(load[0], 2) if load else None,
            "load_seconds_later_mean": round(statistics.fmean(load[1:]), 3) if len(load) > 1 else None,
            "settings": mine[0]["settings"],
        }
    return out


def check_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6's targets, each with the measured value and ``met`` (``None`` when not measured)."""
    out = []
    vq = summary.get("vqgan+clip")
    for attr, goal in VQGAN_TARGETS.items():
        value = vq["accuracy"][attr] if vq else None
        out.append({"target": f"VQGAN+CLIP {attr} right in >= {goal:.0%} of images",
                    "measured": None if value is None else f"{value:.1%} of {vq['n']}",
                    "met": None if value is None else value >= goal - 1e-9})
    plain, guided = summary.get("sd"), summary.get("sd+clip")
    text = f"SD + CLIP guidance >= {SD_GUIDANCE_GAIN * 100:.0f} points better than SD without it on unguided SD's weakest attribute"
    if plain and guided:
        weakest = min(ATTRIBUTES, key=lambda a: plain["accuracy"][a])  # ties: first in ATTRIBUTES order
        gain = guided["accuracy"][weakest] - plain["accuracy"][weakest]
        out.append({"target": text, "attribute": weakest,
                    "measured": f"{weakest}: {plain['accuracy'][weakest]:.1%} -> {guided['accuracy'][weakest]:.1%} "
                                f"({gain * 100:+.1f} points, n={plain['n']}/{guided['n']})",
                    "met": gain >= SD_GUIDANCE_GAIN - 1e-9})
    else:
        out.append({"target": text, "measured": None, "met": None})
    text = f"SD + CLIP guidance >= {SD_ALL_THREE_GAIN * 100:.0f} points better than SD without it on all three"
    if plain and guided:
        gain = guided["accuracy"]["all"] - plain["accuracy"]["all"]
        out.append({"target": text, "measured": f"{plain['accuracy']['all']:.1%} -> {guided['accuracy']['all']:.1%} "
                                                f"({gain * 100:+.1f} points, n={plain['n']}/{guided['n']})",
                    "met": gain >= SD_ALL_THREE_GAIN - 1e-9})
    else:
        out.append({"target": text, "measured": None, "met": None})
    guiders = {k: v for k, v in summary.items() if k.startswith("sd+") and k != "sd+clip"}
    text = (f"the best guider >= {GUIDER_GAIN * 100:.0f} points better than SD + CLIP guidance (clip rule) on all three")
    if guided and guiders:
        best = max(guiders, key=lambda k: guiders[k]["accuracy"]["all"])
        gain = guiders[best]["accuracy"]["all"] - guided["accuracy"]["all"]
        out.append({"target": text, "measured": f"{best}: {guiders[best]['accuracy']['all']:.1%} vs "
                                                f"{guided['accuracy']['all']:.1%} ({gain * 100:+.1f} points)",
                    "met": gain >= GUIDER_GAIN - 1e-9})
    else:
        out.append({"target": text, "measured": None, "met": None})
    return out


def format_table(summary: dict[str, dict[str, Any]], reference: dict[str, Any] | None = None) -> str:
    """The per-variant summary as a plain-text table."""
    labels = {v.name: v.label for v in VARIANTS}
    head = f"{'variant':<34} {'n':>3} {'all3':>7} {'95% CI':>13} {'colour':>7} {'shape':>7} {'backgr':>7} " \
           f"{'clip_b':>7} {'s/img':>7} {'gen s':>7} {'load s':>7} {'total s':>8}"
    lines = [head, "-" * len(head)]

    def pct(x):
        return f"{x:7.1%}"

    for name, s in summary.items():
        a = s["accuracy"]
        score = "-" if s["clip_score"] is None else f"{s['clip_score']:.2f}"
        gen = "-" if s["generate_seconds_per_image"] is None else f"{s['generate_seconds_per_image']:.2f}"
        load = "-" if s["load_seconds_total"] is None else f"{s['load_seconds_total']:.1f}"
        low, high = s.get("all_three_ci95") or (None, None)
        ci = "-" if low is None else f"{low:.0%}-{high:.0%}"
        lines.append(f"{labels.get(name, name):<34} {s['n']:>3} {pct(a['all'])} {ci:>13} {pct(a['colour'])} "
                     f"{pct(a['shape'])} {pct(a['background'])} {score:>7} {s['seconds_per_image']:>7.2f} "
                     f"{gen:>7} {load:>7} {s['seconds_total']:>8.1f}")
    if reference is not None:
        a = reference["accuracy"]
        score = "-" if reference["clip_score"] is None else f"{reference['clip_score']:.2f}"
        lines.append(f"{'(true world images)':<34} {reference['n']:>3} {pct(a['all'])} {'':>13} {pct(a['colour'])} "
                     f"{pct(a['shape'])} {pct(a['background'])} {score:>7}")
    return "\n".join(lines)


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    mark = {True: "MET    ", False: "NOT MET", None: "not run"}
    return "\n".join(f"[{mark[t['met']]}] {t['target']}: {t['measured'] or 'not measured'}" for t in targets)


def quality_vs_time_figure(summary: dict[str, dict[str, Any]], *, title: str = "", size=(860, 470)):
    """Share of images with all three attributes right against seconds per image (log scale), one point
    per variant with its 95% interval as a vertical bar. PIL only."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 70, 320, 40, 60
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
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
    draw.text((12, top - 22), "images with colour, shape and background all right", fill=(30, 30, 30), font=font)
    if title:
        draw.text((width - 12, height - 4), title, fill=(120, 120, 120), font=font, anchor="rs")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
               (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127)]
    labels = {v.name: v.label for v in VARIANTS}
    for k, (name, s) in enumerate(points):
        colour = colours[k % len(colours)]
        x, y = xy(s["seconds_per_image"], s["accuracy"]["all"])
        low, high = s.get("all_three_ci95") or (s["accuracy"]["all"],) * 2
        _, y_low = xy(s["seconds_per_image"], low)
        _, y_high = xy(s["seconds_per_image"], high)
        draw.line([x, y_low, x, y_high], fill=colour, width=2)
        for yy in (y_low, y_high):
            draw.line([x - 4, yy, x + 4, yy], fill=colour, width=2)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        ly = top + 10 + 20 * k
        draw.ellipse([width - right + 14, ly - 5, width - right + 24, ly + 5], fill=colour)
        draw.text((width - right + 30, ly), f"{labels.get(name, name)} ({s['accuracy']['all']:.0%})",
                  fill=(30, 30, 30), font=font, anchor="lm")
    return image


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=None, metavar="N", help=f"number of prompts (default {DEFAULT_PROMPTS})")
    parser.add_argument("--prompt-seed", type=int, default=0, metavar="N", help="seed of the prompt sample")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"generation seeds per prompt: 0..N-1 (+ --seed-base; default {DEFAULT_SEEDS})")
    parser.add_argument("--seed-base", type=int, default=0, metavar="N", help="first generation seed")
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
                        help=f"a quick run: {QUICK['prompts']} prompts x {QUICK['seeds']} seed, "
                             f"{QUICK['iterations']} iterations / {QUICK['steps']} steps (explicit options win)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch CPU threads (default 1: fastest for the toy models on a shared machine)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="FILE",
                        help="write results here (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="do not generate: combine the rows of earlier runs' JSON files (e.g. variants run as "
                             "parallel processes on the same prompt set) into one table, targets and picture")
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, metavar="PNG",
                        help="the quality-vs-time picture (default: %(default)s; the README's is "
                             "docs/images/quality_vs_time.png); 'none' for no picture")
    args = parser.parse_args(argv)
    for key in ("prompts", "seeds", "iterations", "steps"):
        if getattr(args, key) is None and args.quick:
            setattr(args, key, QUICK[key])
    args.prompts = DEFAULT_PROMPTS if args.prompts is None else args.prompts
    args.seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    extra = {}
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set {item!r}: write KEY=VALUE, e.g. --set learning_rate=0.1")
        extra[key.strip().replace("-", "_")] = value
    args.extra = extra
    for key in ("seeds", "iterations", "steps", "threads"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} is {value}; give at least 1")
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
            "complete": all(r.get("complete") for r in reports), "prompts": first["prompts"], "seeds": first["seeds"],
            "reference": first.get("reference"), "rows": rows, "summary": summary, "targets": check_targets(summary)}


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.merge:
        if args.json.exists() and not args.overwrite:
            print(f"error: {args.json} already exists; pass --overwrite to replace it or --json NEW_FILE", file=sys.stderr)
            return 2
        try:
            report = merge_reports(args.merge)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        _write_json(args.json, report)
        n_prompts = len(report["prompts"])
        print(format_table(report["summary"], report["reference"]))
        print("\nTargets:")
        print(format_targets(report["targets"]))
        if str(args.figure).lower() != "none":
            figure = quality_vs_time_figure(report["summary"], title=f"toy world, {n_prompts} prompts x "
                                            f"{len(report['seeds'])} seeds; 95% Wilson intervals")
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            figure.save(args.figure)
            print(f"figure: {args.figure}")
        return 0
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    if args.json.exists() and not args.overwrite:
        print(f"error: {args.json} already exists; pass --overwrite to replace it or --json NEW_FILE",
              file=sys.stderr)
        return 2
    try:
        prompts = sample_prompts(args.prompts, seed=args.prompt_seed)
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
    reference = reference_scores(prompts, judge_clip, seed=args.prompt_seed)
    report: dict[str, Any] = {
        "command": command, "complete": False, "environment": _environment(args.threads),
        "prompts": prompts, "seeds": seeds,
        "variants": {v.name: {"label": v.label, "backend": v.backend, "options": v.options} for v in chosen},
        "overrides": {"iterations": args.iterations, "steps": args.steps,
                      "clip_guidance_scale": args.clip_guidance_scale},
        "judge_clip": None if judge_clip is None else str(judge_clip.name), "judge_clip_note": judge_note,
        "judge_clip_load_s": round(judge_load_s, 3),
        "clip_score_definition": "torchmetrics per image (100*cos with the judging CLIP clip_b); mean over images",
        "skipped": skipped, "reference": reference, "summary": {}, "targets": [], "rows": [],
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
    report["targets"] = check_targets(report["summary"])
    report["complete"] = not interrupted
    _write_json(args.json, report)

    print(f"\nToy-world quality ({len(prompts)} prompts x {len(seeds)} seeds; judge: toyworld.judge; "
          f"clip_b: torchmetrics CLIP score under the judging toy CLIP)")
    print(f"command: {command}")
    print(format_table(report["summary"], reference))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print("\nTargets:")
    print(format_targets(report["targets"]))
    if str(args.figure).lower() != "none" and report["summary"]:
        figure = quality_vs_time_figure(report["summary"], title=f"toy world, {len(prompts)} prompts x {len(seeds)} "
                                        f"seeds (prompt seed {args.prompt_seed}); 95% Wilson intervals")
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        figure.save(args.figure)
        print(f"figure: {args.figure}")
    print(f"\ntotal {report['seconds_total']:.1f}s; JSON: {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
