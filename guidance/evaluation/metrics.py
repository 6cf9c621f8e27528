"""Several metrics at once: CLIP score and reward models, one column each (``scripts/evaluate.py --metric``),
with the held-out view that leaves out the models a run was steered by."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import torch

from ..score import pair_scores
from .pairs import Item
from .report import atomic_write, cell, check_group_by, describe, extra_columns, grouped, with_columns
from .scoring import load_item


# ---------------------------------------------------------------------------------------------
# Several metrics: CLIP score and reward models, one column each (scripts/evaluate.py --metric)
# ---------------------------------------------------------------------------------------------

METRICS_FORMAT = "clipsteer-metrics/1"
METRIC_BASE_COLUMNS = ("image", "prompt", "seed", "backend", "status", "error", "steered_by")


TOY_JUDGE = "toy_judge"  # toy world v3's judging rule as a metric: 1 right, 0 wrong (shared/TOYWORLD.md)


def metric_name(spec: str) -> tuple[str, str | None]:
    """``clip_score[:MODEL]`` or a reward ``NAME[:MODEL]`` -> (``"clip_score"`` or the reward's
    registered name, model or None); one-line error for anything else (a weight is refused)."""
    from ..rewards import parse_reward_spec

    spec = str(spec).strip()
    name, _, model = spec.partition(":")
    if name.strip().lower() in ("clip_score", "clipscore"):
        return "clip_score", (model.strip() or None)
    if name.strip().lower() == TOY_JUDGE:
        if model.strip():
            raise ValueError(f"metric {spec!r}: {TOY_JUDGE} takes no model; write {TOY_JUDGE}")
        return TOY_JUDGE, None
    if "=" in spec:
        raise ValueError(f"metric {spec!r}: metrics take no weight; write NAME[:MODEL]")
    key, model, _ = parse_reward_spec(spec)
    return key, model


def is_steered(spec: str, item: Item) -> bool:
    """Whether the run *item* comes from was steered by metric *spec* (read from its run.json)."""
    from ..rewards import CLIPReward
    from ..score import DEFAULT_MODEL

    name, model = metric_name(spec)
    steered = item.extra.get("steered_by") or []
    if name in ("clip_score", "clip"):
        target = model or (DEFAULT_MODEL if name == "clip_score" else CLIPReward.default_model)
        return any(s.startswith("clip:") and _same_model(s[5:], target) for s in steered)
    return name in steered


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def _metric_scorer(spec: str, *, device, precision):
    """A function ``(images [3,H,W] uint8 list, captions) -> scores [N] float64`` for one metric spec."""
    from ..score import DEFAULT_MODEL, get_score_model

    name, model = metric_name(spec)
    if name == TOY_JUDGE:
        return _toy_judge_scores
    if name == "clip_score":
        sm = get_score_model(model or DEFAULT_MODEL, device=device, precision=precision)
        return lambda images, captions: pair_scores(sm.cosine(images, captions), "torchmetrics")
    from ..rewards import cached_reward

    reward = cached_reward(f"{name}:{model}" if model else name, device=device, precision=precision)
    return lambda images, captions: reward.score_reference(images, captions)


def _toy_judge_scores(images: Sequence[torch.Tensor], captions: Sequence[str]) -> torch.Tensor:
    """1.0 where the toy world's rule reads the image right for its prompt, 0.0 where wrong, NaN where the
    caption is not a toy-world prompt."""
    from toyworld.prompts import is_world_prompt
    from toyworld.rule import judge

    out = torch.full((len(images),), float("nan"), dtype=torch.float64)
    ok = [i for i, c in enumerate(captions) if c and is_world_prompt(c)]
    if ok:
        verdicts = judge([images[i].float() / 255.0 for i in ok], [captions[i] for i in ok])
        out[ok] = torch.tensor(verdicts, dtype=torch.float64)
    return out


def evaluate_metrics(items: Sequence[Item], metrics: Sequence[str], *, batch_size: int = 16, device=None,
                     precision=None, show_progress: bool = True) -> list[dict]:
    """One row per item with one column per metric (named as given), each metric in its reference
    form: ``clip_score`` is torchmetrics' per-pair ``100*cos``; rewards use their reference preprocessing
    on the 8-bit images. ``steered_by`` lists what steered the item's run (from run.json)."""
    from tqdm.auto import tqdm

    metrics = list(dict.fromkeys(str(m).strip() for m in metrics))
    if not metrics:
        raise ValueError("no metric given; e.g. --metric clip_score --metric pickscore")
    for m in metrics:
        metric_name(m)                       # every spec checked before any model loads
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")
    device = None if device == "auto" else device
    rows = [with_columns({"image": it.image, "prompt": it.prompt or "", "seed": it.extra.get("seed", ""),
                           "backend": it.extra.get("backend", ""), "status": "ok" if it.error is None else "error",
                           "error": it.error or "", "steered_by": " ".join(it.extra.get("steered_by") or []),
                           **{m: None for m in metrics}}, it) for it in items]
    todo = [i for i, it in enumerate(items) if it.error is None]
    images: dict[int, torch.Tensor] = {}
    for i in todo:
        loaded = load_item(items[i])
        if isinstance(loaded, torch.Tensor):
            images[i] = loaded
        else:
            rows[i].update(status="error", error=loaded)
    ok = [i for i in todo if i in images]
    for spec in metrics:
        scorer = _metric_scorer(spec, device=device, precision=precision)
        with tqdm(total=len(ok), desc=spec, unit="img", disable=not show_progress) as bar:
            for start in range(0, len(ok), batch_size):
                chunk = ok[start:start + batch_size]
                scores = scorer([images[i] for i in chunk], [items[i].prompt for i in chunk])
                for i, value in zip(chunk, scores.tolist()):
                    rows[i][spec] = None if math.isnan(value) else float(value)
                bar.update(len(chunk))
    for i, it in enumerate(items):
        rows[i]["held_out"] = {m: not is_steered(m, it) for m in metrics}
    return rows


def summarize_metrics(rows: Sequence[dict], metrics: Sequence[str], *, held_out: bool = False,
                      confidence: float = 0.95, group_by: str | None = None) -> list[dict]:
    """Per metric (plain means; no clamping): n, mean, std and CI over all scored images, or with
    *held_out* split into the images whose run that metric did not steer (``held-out``) and those it
    did (``steered``), as ReNO reports held-out rewards to expose reward hacking; then one group per
    value of column *group_by* (e.g. DrawBench's ``category``, GenEval's ``tag``), and for ``toy_judge``
    one per toy-world category."""
    check_group_by(rows, group_by)
    out = []
    for m in metrics:
        scored = [r for r in rows if r["status"] == "ok" and r.get(m) is not None]
        groups = [("all", scored)]
        if held_out:
            groups = [("held-out", [r for r in scored if r["held_out"][m]]),
                      ("steered", [r for r in scored if not r["held_out"][m]])]
        if group_by is not None:
            groups += grouped(scored, group_by)
        elif metric_name(m)[0] == TOY_JUDGE:  # per category, as GenEval reports
            from toyworld.prompts import parse_prompt

            groups += sorted(grouped(scored, "", key=lambda r: parse_prompt(r["prompt"]).category))
        for group, rs in groups:
            out.append({"metric": m, "group": group, **describe([float(r[m]) for r in rs], "per_pair", confidence)})
    return out


def format_metric_summary(summary: Sequence[dict], rows: Sequence[dict] = ()) -> str:
    fmt = (lambda v: "   -" if v is None else f"{v:.4f}")
    width = max([len("metric")] + [len(s["metric"]) for s in summary])
    gw = min(40, max([9] + [len(s["group"]) for s in summary]))
    lines = [f"  {'metric':<{width}}  {'images':<{gw}}  {'n':>5}  {'mean':>9}  {'std':>8}  95% CI"]
    for s in summary:
        ci = f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]" if s["ci_low"] is not None else "-"
        group = s["group"] if len(s["group"]) <= gw else s["group"][:gw - 1] + "…"
        lines.append(f"  {s['metric']:<{width}}  {group:<{gw}}  {s['n']:>5}  {fmt(s['mean']):>9}  "
                     f"{fmt(s['std']):>8}  {ci}")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines.append(f"not scored ({len(bad)}):")
        lines += [f"  - {r['image']}: {r['error']}" for r in bad[:20]]
    return "\n".join(lines)


def write_metric_table(rows: Sequence[dict], summary: Sequence[dict], metrics: Sequence[str], *,
                       json_path: Path | None = None, csv_path: Path | None = None, meta: dict | None = None) -> None:
    """The per-image metric table (one column per metric) as JSON (with the summary) and/or CSV."""
    if json_path is not None:
        doc = {"format": METRICS_FORMAT, "metrics": list(metrics), **(meta or {}), "rows": list(rows),
               "summary": list(summary)}
        atomic_write(Path(json_path), json.dumps(doc, indent=1, ensure_ascii=False, default=str))
    if csv_path is not None:
        import io

        buf = io.StringIO()
        columns = [*METRIC_BASE_COLUMNS, *metrics]
        columns += extra_columns(rows, columns)
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{k: cell(r.get(k)) for k in columns[len(METRIC_BASE_COLUMNS) + len(metrics):]},
                             **{m: "" if r.get(m) is None else repr(float(r[m])) for m in metrics}})
        atomic_write(Path(csv_path), buf.getvalue())
