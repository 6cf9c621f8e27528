"""Choose the SD guiders' settings by measurement on the toy world's TUNING prompts (issue 19).

Runs a small grid of guider settings (``--guider clip/dps/mpgd/freedom/ugd/tfg`` with their strengths,
recurrence, backward steps and TFG's smoothing) on toy world v3's TUNING prompt set
(``toyworld.prompts.prompt_set("tuning")``, generation seeds from 100), judges every image by the world's
rule (``toyworld.rule``), and prints each setting's per-category and overall accuracy and seconds per
image, the best setting overall and the best per guider. The benchmark set is never used here: settings
chosen on it would flatter the benchmark.

    python benchmarks/tune_guiders.py                                # the "small" grid, 2 prompts per category x 1 seed
    python benchmarks/tune_guiders.py --grid probe --per-category 3 --seeds 100 101
    python benchmarks/tune_guiders.py --guiders tfg ugd --budget-minutes 10 --json benchmarks/results/tune.json

JSON (``--json``, default ``benchmarks/results/tune_guiders.json``) is rewritten after every
setting, so a run cut by ``--budget-minutes`` or Ctrl-C keeps what it measured. Everything is
measured on the committed toy SD (``toyworld/weights/sd``); retrain it and the numbers change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# Run as ``python benchmarks/tune_guiders.py``: this file's folder is first on sys.path, so the quality
# benchmark's package (benchmarks/toy_quality) imports as ``toy_quality``.
from toy_quality import (SEED_BASES, _environment, _quiet_loading, _write_json, benchmark_prompts,
                         missing_toy_models, run_benchmark, summarise)
from toyworld.variants import Variant

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "tune_guiders.json"
TUNING_SEEDS = (SEED_BASES["tuning"],)
MODELS = ("clip_a", "clip_c", "clip_d", "sd")
RECURRENT = {"scheduler": "ddim"}   # self-recurrence needs a scheduler whose step can be repeated
# the rows written before each guider had its own defaults (generators/diffusion/guiders/defaults.py) meant a constant mu
CONSTANT_MU = {"backward_schedule": "constant"}

# name -> list of (guider, options). "clip" at the preset's own settings is today's rule (the baseline).
GRIDS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "probe": [
        ("clip", {"clip_guidance_scale": 0.0}),
        ("clip", {}),
        *[("dps", {"clip_guidance_scale": s}) for s in (1.0, 10.0, 100.0)],
        *[("mpgd", {"clip_guidance_scale": s}) for s in (1.0, 10.0, 100.0)],
        *[("freedom", {"clip_guidance_scale": s}) for s in (0.1, 0.5, 2.0)],
        *[("ugd", {"backward_steps": 2, "backward_lr": lr}) for lr in (1.0, 10.0, 100.0)],
        *[("tfg", {"clip_guidance_scale": s, "backward_steps": 1, "backward_lr": lr, **CONSTANT_MU})
          for s, lr in ((1.0, 1.0), (10.0, 10.0))],
    ],
    # one or two settings per guider around the probe's best strengths (what fits ~10 CPU minutes)
    "small": [
        ("clip", {"clip_guidance_scale": 0.0}),
        ("clip", {}),
        ("dps", {"clip_guidance_scale": 1.0}),
        ("mpgd", {"clip_guidance_scale": 10.0}),
        ("freedom", {"clip_guidance_scale": 0.5}),
        ("ugd", {"backward_steps": 2, "backward_lr": 1.0}),
        ("ugd", {"backward_steps": 2, "backward_lr": 1.0, "recurrence": 2, **RECURRENT}),
        ("tfg", {"clip_guidance_scale": 1.0, "backward_steps": 2, "backward_lr": 1.0, **CONSTANT_MU}),
        ("tfg", {"clip_guidance_scale": 1.0, "backward_steps": 2, "backward_lr": 1.0, "recurrence": 2, **RECURRENT,
                 **CONSTANT_MU}),
        ("tfg", {"clip_guidance_scale": 1.0, "backward_steps": 2, "backward_lr": 3.0, "smoothing": 0.1,
                 "backward_schedule": "increasing"}),
    ],
    # a second pass after comparing the size of each guider's change of x_{t-1} with the clip rule's
    # (rho ~1 matches it at the noisy steps; mu ~10 in the middle; mu grows late, hence decreasing)
    "calibrated": [
        ("tfg", {"clip_guidance_scale": 1.0, "backward_steps": 2, "backward_lr": 10.0, **CONSTANT_MU}),
        ("tfg", {"clip_guidance_scale": 1.0, "backward_steps": 2, "backward_lr": 10.0,
                 "backward_schedule": "decreasing"}),
        ("tfg", {"clip_guidance_scale": 3.0, "backward_steps": 2, "backward_lr": 10.0, "smoothing": 0.1,
                 "backward_schedule": "decreasing"}),
        ("mpgd", {"clip_guidance_scale": 30.0, "guidance_schedule": "decreasing"}),
    ],
    # the toy SD v2 (retrained VAE and UNet) takes the clip rule at scale 500 where the first took 100, so
    # each guider's strength is searched again around five times its first-SD setting
    "toy-v2": [
        ("clip", {"clip_guidance_scale": 0.0}),
        ("clip", {}),
        *[("dps", {"clip_guidance_scale": s}) for s in (1.0, 5.0, 25.0)],
        *[("mpgd", {"clip_guidance_scale": s}) for s in (10.0, 50.0, 250.0)],
        *[("freedom", {"clip_guidance_scale": s}) for s in (0.5, 2.5, 12.5)],
        *[("ugd", {"backward_steps": 2, "backward_lr": lr}) for lr in (1.0, 5.0, 25.0)],
        *[("tfg", {"clip_guidance_scale": rho, "backward_steps": 2, "backward_lr": mu, "backward_schedule": "decreasing"})
          for rho, mu in ((1.0, 10.0), (5.0, 10.0), (5.0, 50.0))],
    ],
    # toy world v3 (a retrained toy SD, compositional prompts): every guider's strength searched again around its
    # toy-v2 setting, the clip rule from 50 to 500 (the v2 preset's scale)
    "toy-v3": [
        ("clip", {"clip_guidance_scale": 0.0}),
        *[("clip", {"clip_guidance_scale": s}) for s in (50.0, 150.0, 500.0)],
        *[("dps", {"clip_guidance_scale": s}) for s in (0.3, 1.0, 3.0)],
        *[("mpgd", {"clip_guidance_scale": s}) for s in (10.0, 50.0, 250.0)],
        *[("freedom", {"clip_guidance_scale": s}) for s in (0.2, 0.5, 2.0)],
        *[("ugd", {"clip_guidance_scale": s, "backward_steps": 2, "backward_lr": lr}) for s, lr in ((150.0, 1.0), (500.0, 5.0))],
        *[("tfg", {"clip_guidance_scale": rho, "backward_steps": 2, "backward_lr": mu, "backward_schedule": "decreasing"})
          for rho, mu in ((1.0, 10.0), (5.0, 10.0), (5.0, 50.0))],
    ],
    # the attention-steering methods (no CLIP guidance) at their step sizes around the references' defaults
    "composition-v3": [
        *[("none", {"attend_excite": True, "excite_scale": s}) for s in (10.0, 20.0, 40.0)],
        *[("none", {"layout": "auto", "layout_scale": s}) for s in (10.0, 30.0, 100.0)],
    ],
    # TFG's own search space (Ye et al. 2024 search rho, mu, sigma and recurrence; here a grid): hours on a CPU
    "tfg": [
        ("clip", {"clip_guidance_scale": 0.0}),
        ("clip", {}),
        *[("tfg", {"clip_guidance_scale": rho, "backward_steps": 2, "backward_lr": mu, "smoothing": sigma,
                   "recurrence": k, "guidance_schedule": sched, "backward_schedule": sched,
                   **(RECURRENT if k > 1 else {})})
          for rho in (0.3, 1.0, 3.0) for mu in (0.3, 1.0, 3.0) for sigma in (0.0, 0.1) for k in (1, 2)
          for sched in ("constant", "increasing")],
    ],
}


def setting_name(guider: str, options: dict[str, Any]) -> str:
    short = {"clip_guidance_scale": "scale", "backward_steps": "M", "backward_lr": "lr", "recurrence": "K",
             "guidance_schedule": "sched", "guidance_gradient": "grad", "smoothing": "sigma", "scheduler": "sch"}
    inner = ",".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
                     for k, v in options.items())
    return f"{guider}[{inner}]" if inner else guider


def variants_of(grid: Sequence[tuple[str, dict[str, Any]]], guiders: Sequence[str] | None) -> list[Variant]:
    out = []
    for guider, options in grid:
        if guiders is not None and guider not in guiders:
            continue
        out.append(Variant(setting_name(guider, options), f"SD, guider {guider}", "sd",
                           {"guider": guider, **options}, MODELS))
    return out


def rank(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Settings best first: overall accuracy (mean of the categories), then speed."""
    return sorted(summary, key=lambda name: (-summary[name]["overall"], summary[name]["seconds_per_image"]))


def _categories(s: dict[str, Any]) -> str:
    return " ".join(f"{c} {v['accuracy']:.0%}" for c, v in s["categories"].items())


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'setting':<72} {'overall':>7} {'s/img':>7}  per category"]
    for name in rank(summary):
        s = summary[name]
        lines.append(f"{name:<72} {s['overall']:>7.1%} {s['seconds_per_image']:>7.2f}  {_categories(s)}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default="small", help="which grid of settings (default small)")
    p.add_argument("--guiders", nargs="+", default=None, metavar="NAME",
                   help="only these guiders' rows (clip: the unguided and today's rule)")
    p.add_argument("--per-category", type=int, default=2, metavar="N", help="tuning prompts per category (default 2)")
    p.add_argument("--categories", nargs="+", default=None, metavar="NAME", help="only these categories (default all)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(TUNING_SEEDS), metavar="S",
                   help=f"generation seeds (default {' '.join(map(str, TUNING_SEEDS))})")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the sd backend's)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="stop starting new settings after M minutes (the rows so far are kept)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads (default 1)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    try:
        args.prompts = benchmark_prompts("tuning", args.per_category, args.categories)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import shlex

    import torch

    args = parse_args(argv)
    missing = missing_toy_models(MODELS)
    if missing:
        print(f"toy models missing: {', '.join(missing)}; train them first", file=sys.stderr)
        return 1
    _quiet_loading()
    torch.set_num_threads(args.threads)
    prompts = args.prompts
    variants = variants_of(GRIDS[args.grid], args.guiders)
    command = "python benchmarks/tune_guiders.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    print(f"{len(prompts)} tuning prompts x seeds {args.seeds} x "
          f"{len(variants)} settings", flush=True)
    started, rows, complete = time.perf_counter(), [], True
    data: dict[str, Any] = {"command": command.strip(), "prompt_set": "tuning", "seeds": args.seeds,
                            "prompts": [p.text for p in prompts], "environment": _environment(args.threads),
                            "note": "measured on the committed toy SD (toyworld/weights/sd); a retrained one changes it"}
    for variant in variants:
        if args.budget_minutes is not None and time.perf_counter() - started > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes:g} minutes spent; {len(variants) - len({r['variant'] for r in rows})} "
                  "settings not run", flush=True)
            complete = False
            break
        out = run_benchmark(prompts, args.seeds, [variant], steps=args.steps, threads=args.threads, device="cpu",
                            log=lambda line: None)
        rows.extend(out["rows"])
        summary = summarise(rows)
        s = summary[variant.name]
        print(f"{variant.name:<72} overall {s['overall']:.1%}  {_categories(s)}  {s['seconds_per_image']:.2f} s/img",
              flush=True)
        ranked = rank(summary)
        data.update(complete=False, summary=summary, ranking=ranked, rows=rows,
                    options={v.name: v.options for v in variants})
        _write_json(args.json, data)
        if out["interrupted"]:
            complete = False
            break
    summary = summarise(rows)
    ranked = rank(summary)
    best_per_guider = {}
    for name in ranked:
        guider = next(v.options["guider"] for v in variants if v.name == name)
        if summary[name]["settings"].get("clip_guidance_scale") == 0.0 and guider == "clip":
            guider = "none"
        best_per_guider.setdefault(guider, name)
    data.update(complete=complete, summary=summary, ranking=ranked, best=ranked[0] if ranked else None,
                best_per_guider=best_per_guider, seconds=round(time.perf_counter() - started, 1))
    _write_json(args.json, data)
    print()
    print(format_table(summary))
    if ranked:
        print(f"\nbest: {ranked[0]} (overall {summary[ranked[0]]['overall']:.1%}, "
              f"{summary[ranked[0]]['seconds_per_image']:.2f} s/img)")
        print("best per guider: " + "; ".join(f"{g}: {n}" for g, n in best_per_guider.items()))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
