"""The statistics of the quality benchmark: 95% Wilson intervals, the per-variant summary (accuracy per
category, overall = the mean of the categories), points over unguided SD, issue 33's target, and the
plain-text table."""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from toyworld.variants import VARIANTS

# issue 33's target: the best method reaches this overall accuracy with every category at least CATEGORY_FLOOR
OVERALL_TARGET, CATEGORY_FLOOR = 0.90, 0.75


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
