"""How much a best-of-N search could gain, and how much its verifier keeps: ``python benchmarks/search_headroom.py --help``.

For each prompt of a toy-world prompt set, one search variant of ``benchmarks/quality.py`` (``--variant``,
a ``best-of-n`` row of ``toyworld/variants.py``) is run once through the public API with a step callback that
keeps every candidate it renders. The world's rule judges every candidate (an analysis of the method, never
part of it), and per category the JSON reports:

- ``headroom[N]``: the share of prompts with at least one right image among the first N candidates (what a
  perfect verifier would reach with N noises);
- ``kept``: the share whose kept image (the verifier's choice over all candidates) is right -- what
  ``quality.py`` reports for the variant;
- ``right_share``: the share of right candidates (what one random noise reaches).

    python benchmarks/search_headroom.py --prompt-set tuning --per-category 16 --variant sd10+best-of-60+itm \\
        --json headroom.json
    python benchmarks/search_headroom.py --categories position --per-category 4 --json h.json   # a quick look
    python benchmarks/search_headroom.py --variant sd10+sketch+best-of-30+itm --set strength=0.6 --set budget=10 \\
        --json s06.json        # a renderer setting, by the share of right candidates it draws (--set: any option)

Costs one decoder pass more per candidate than the search itself (the callback renders what it keeps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from toy_quality.cli import parse_set_options
from toy_quality.runner import SEED_BASES, _write_json, benchmark_prompts, start_analysis, variant_options


def parse_args(argv=None) -> argparse.Namespace:
    from toyworld.prompts import CATEGORIES
    from toyworld.variants import VARIANTS

    searches = [v.name for v in VARIANTS if v.options.get("method") == "best-of-n" and (v.options.get("budget") or 30) > 1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-set", default="tuning", choices=sorted(SEED_BASES),
                   help="tuning (default: this is for choosing verifiers) or benchmark")
    p.add_argument("--per-category", type=int, default=8, metavar="N", help="prompts per category (default 8)")
    p.add_argument("--categories", nargs="+", choices=CATEGORIES, default=None, help="only these categories")
    p.add_argument("--variant", default="sd10+best-of-60+itm", choices=searches, help="the search to analyse")
    p.add_argument("--json", type=Path, required=True, help="where to write the results (not overwritten)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                   help="change one option of the variant (repeatable), as quality.py's --set: e.g. "
                        "--set strength=0.6 --set budget=10")
    args = p.parse_args(argv)
    args.extra = parse_set_options(args.extra, p.error)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = start_analysis("search_headroom.py", args.json, args.threads, argv)
    if report is None:
        return 2
    import torch

    from generators.runs import generate
    from toyworld.rule import matches, read_images
    from toyworld.variants import variant

    v = variant(args.variant)
    opts = variant_options(v, iterations=None, steps=None, clip_guidance_scale=None, extra=args.extra)
    prompts = benchmark_prompts(args.prompt_set, args.per_category, args.categories)
    seed = SEED_BASES[args.prompt_set]
    report.update({"variant": v.name, "options": {**v.options, **args.extra}, "prompt_set": args.prompt_set,
                   "seed": seed, "rows": []})
    for k, p in enumerate(prompts):
        frames: list[torch.Tensor] = []
        t0 = time.perf_counter()
        run = generate(p.text, backend=v.backend, preset="toy", seed=seed, save=False, progress=False,
                       eval_model="none", threads=args.threads, callback=lambda info: frames.append(info.decode()),
                       **opts)
        right = [bool(matches(p, r.background, r.objects)) for r in read_images(torch.cat(frames))]
        kept = read_images(run.images)[0]
        report["rows"].append({"prompt": p.text, "category": p.category, "right": right,
                               "kept_right": bool(matches(p, kept.background, kept.objects)),
                               "seconds": round(time.perf_counter() - t0, 2)})
        report["summary"] = summarise(report["rows"])
        _write_json(args.json, report)
        print(f"[{k + 1}/{len(prompts)}] {p.text!r}: {sum(right)}/{len(right)} right; kept "
              f"{'right' if report['rows'][-1]['kept_right'] else 'wrong'}", file=sys.stderr)
    for category, s in report["summary"].items():
        heads = ", ".join(f"{n}: {share:.0%}" for n, share in s["headroom"].items())
        print(f"{category:<12} kept {s['kept']:.0%}; a right image among the first N (N: share) {heads}; "
              f"right candidates {s['right_share']:.0%}")
    return 0


def summarise(rows: list[dict]) -> dict:
    """Per category (and ``overall``, the mean of the categories): ``kept``, ``headroom`` at 1, 10, 30, 60, ...
    up to the budget, and ``right_share``."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["category"], []).append(r)
    budget = min(len(r["right"]) for r in rows)
    marks = [n for n in (1, 10, 30, 60, 120) if n < budget] + [budget]
    out = {c: {"prompts": len(rs), "kept": sum(r["kept_right"] for r in rs) / len(rs),
               "headroom": {str(n): sum(any(r["right"][:n]) for r in rs) / len(rs) for n in marks},
               "right_share": sum(sum(r["right"]) for r in rs) / sum(len(r["right"]) for r in rs)}
           for c, rs in by.items()}
    cats = list(out.values())
    out["overall"] = {"prompts": len(rows), "kept": sum(c["kept"] for c in cats) / len(cats),
                      "headroom": {str(n): sum(c["headroom"][str(n)] for c in cats) / len(cats) for n in marks},
                      "right_share": sum(c["right_share"] for c in cats) / len(cats)}
    return out


if __name__ == "__main__":
    sys.exit(main())
