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
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from toyworld.variants import VARIANT_NAMES, VARIANTS

from .figures import save_figures
from .runner import (DEFAULT_PER_CATEGORY, DEFAULT_SEEDS, SEED_BASES, _environment, _quiet_loading, _write_json,
                     benchmark_prompts, load_judge_clip, missing_toy_models, reference_scores, run_benchmark)
from .summary import check_targets, format_table, format_targets, lifts, summarise

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "quality.json"
QUICK = {"per_category": 1, "seeds": 1, "iterations": 30, "steps": 10}
DEFAULT_FIGURE = ROOT / "benchmarks" / "results" / "quality_vs_time.png"
DEFAULT_BARS = ROOT / "benchmarks" / "results" / "quality_by_category.png"


def parse_set_options(items, error) -> dict[str, str]:
    """``--set KEY=VALUE`` items as ``{key: value}`` (dashes in keys become underscores); a malformed item goes to
    *error* (an argparse parser's ``error``)."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            error(f"--set {item!r}: write KEY=VALUE, e.g. --set budget=10")
        extra[key.strip().replace("-", "_")] = value
    return extra


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
    parser.add_argument("--timing", type=Path, metavar="JSON",
                        help="with --merge: take each variant's seconds per image from this run instead (e.g. "
                             "--per-category 2 run alone on the machine), so jobs that ran side by side do not "
                             "inflate the time axis; accuracy still comes from the merged runs")
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
    args.extra = parse_set_options(args.extra, parser.error)
    if args.timing is not None and not args.merge:
        parser.error("--timing goes with --merge (it replaces the merged runs' seconds per image)")
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


def merge_reports(paths: Sequence[Path], timing: Path | None = None) -> dict[str, Any]:
    """One report from several runs' JSON files. They must share the prompt set and seeds; each may cover a part
    of it (``--categories``, ``--per-category``, a run stopped early). An image (variant, prompt, seed) measured
    by several runs counts once, as the first file has it; each variant's ``n`` says how many images it has.

    ``timing``: another run's JSON whose seconds per image replace the merged ones (each replaced variant records
    ``seconds_from`` and keeps its own figure as ``seconds_per_image_merged``); every merged variant must be in it."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for path, r in zip(paths, reports):
        if r.get("prompt_set") != first.get("prompt_set") or r["seeds"] != first["seeds"]:
            raise ValueError(f"{path} was run on other prompts or seeds than {paths[0]} ({r.get('prompt_set')} set, "
                             f"seeds {r['seeds']}); merge only runs of one set")
    rows, seen = [], set()
    for r in reports:
        for row in r["rows"]:
            key = (row["variant"], row["prompt"], row["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    prompts = list(dict.fromkeys(p for r in reports for p in r["prompts"]))
    summary = summarise(rows)
    if timing is not None:
        timed = summarise(json.loads(Path(timing).read_text())["rows"])
        missing = [name for name in summary if name not in timed]
        if missing:
            raise ValueError(f"{timing} has no timing for {', '.join(missing)}; run them there too "
                             f"(--variants {' '.join(missing)}) or merge without --timing")
        for name, s in summary.items():
            s["seconds_per_image_merged"] = s["seconds_per_image"]
            s["seconds_per_image"] = timed[name]["seconds_per_image"]
            s["seconds_from"] = {"file": str(timing), "images": timed[name]["n"]}
    return {"merged_from": [str(p) for p in paths], "commands": [r.get("command") for r in reports],
            "timing_from": None if timing is None else str(timing),
            "complete": all(r.get("complete") for r in reports), "prompt_set": first.get("prompt_set"),
            "prompts": prompts, "seeds": first["seeds"], "reference": first.get("reference"), "rows": rows,
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
            report = merge_reports(args.merge, args.timing)
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
