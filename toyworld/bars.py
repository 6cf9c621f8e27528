"""The bars a set of toy models must meet to serve as the benchmark's instrument, checked against a
``training_metrics.json``.

The models learn from fixed seeds, and on one machine a retrain repeats bit for bit; on another CPU the
kernels round differently and a retrain is a new draw of the same recipes, which can fall short (a retrain
on a 2-core AMD EPYC gave a judging CLIP at 53% on colour binding; docs/toyworld.md). So a retrain is judged
by its own measurements: ``scripts/train_toy.py`` writes these checks into TRAINING.md and names every miss
when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import CATEGORIES

RECONSTRUCTION_BAR = 0.98  # the VAE's and the VQGAN's reconstructions of drawn scenes right by the rule, per category
JUDGE_BAR = 0.95  # the judging CLIP (clip_b) ranks the true caption above every hard negative, clean images, per category


@dataclass(frozen=True)
class Check:
    model: str  # what was measured, as TRAINING.md names it
    category: str
    value: float
    bar: float

    @property
    def met(self) -> bool:
        return self.value >= self.bar


def _accuracy(score) -> float:
    return float(score["accuracy"] if isinstance(score, dict) else score)


def checks(metrics: dict) -> list[Check]:
    """Every bar that ``metrics`` (a ``training_metrics.json``) has a measurement for, one per model and
    category; models it does not hold are left out."""
    measured = [
        ("SD VAE reconstructions", metrics.get("sd", {}).get("vae", {}).get("judge_by_category"), RECONSTRUCTION_BAR),
        ("VQGAN reconstructions", metrics.get("vqgan", {}).get("judge_by_category"), RECONSTRUCTION_BAR),
        ("judging CLIP clip_b among hard negatives", metrics.get("clip_b", {}).get("hard_negatives", {}).get("clean"),
         JUDGE_BAR),
    ]
    return [Check(model, c, _accuracy(scores[c]), bar)
            for model, scores, bar in measured if scores for c in CATEGORIES]


def misses(metrics: dict) -> list[str]:
    """One line per bar ``metrics`` misses (empty when every measured bar holds)."""
    return [f"{c.model}, {c.category}: {100 * c.value:.1f}% < {100 * c.bar:.0f}%" for c in checks(metrics) if not c.met]


def report_lines(metrics: dict) -> list[str]:
    """TRAINING.md's section on the bars: a table per model, then what is missed."""
    found = checks(metrics)
    if not found:
        return []
    lines = ["## Bars", "",
             f"What these models must reach to serve as the benchmark's instrument: reconstructions right by the rule "
             f"in >= {100 * RECONSTRUCTION_BAR:.0f}% of the drawn scenes of every category, and the judging CLIP right "
             f"among hard negatives (clean) in >= {100 * JUDGE_BAR:.0f}% of every category. A retrain on another CPU is "
             "a new draw of the same recipes (docs/toyworld.md) and is judged here by its own measurements.", "",
             "| model | " + " | ".join(CATEGORIES) + " | bar |", "| --- " * (len(CATEGORIES) + 2) + "|"]
    for model in dict.fromkeys(c.model for c in found):
        row = [c for c in found if c.model == model]
        cells = " | ".join(f"{100 * c.value:.1f}%" + ("" if c.met else " (miss)") for c in row)
        lines.append(f"| {model} | {cells} | {100 * row[0].bar:.0f}% |")
    missed = misses(metrics)
    lines += ["", f"Every bar holds ({len(found)} checks)." if not missed
              else f"{len(missed)} of {len(found)} checks miss their bar: " + "; ".join(missed) + ".", ""]
    return lines
