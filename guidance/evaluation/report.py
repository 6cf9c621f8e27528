"""The score tables: their columns and groups, statistics (mean with a Student-t interval), the printed
summary, and reading/writing the CSV and JSON tables."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..score import reduce_scores

if TYPE_CHECKING:
    from .pairs import Item


TABLE_FORMAT = "clipsteer-clip-scores/1"
COLUMNS = ("image", "prompt", "model", "definition", "prefix", "score", "status", "error", "seed", "backend")

DEFINITION_TEXT = {
    "torchmetrics": "torchmetrics 1.9: per image 100*cos, mean = max(mean of 100*cos, 0)",
    "per_pair": "per pair: per image 100*max(cos, 0), plain mean",
    "hessel": "Hessel et al. 2021: per image 2.5*max(cos, 0), plain mean",
}


# ---------------------------------------------------------------------------------------------
# Table columns and groups
# ---------------------------------------------------------------------------------------------

def with_columns(row: dict, item: Item) -> dict:
    """*row* with the item's extra columns after its own (a column named like one of the row's own is left out)."""
    return {**row, **{k: v for k, v in item.columns.items() if k not in row}}


def extra_columns(rows: Sequence[dict], base: Sequence[str]) -> list[str]:
    """The columns of *rows* beyond *base*, in first-seen order (the pairs file's or GenEval's own)."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in base and k != "held_out"))


def cell(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else json.dumps(value, ensure_ascii=False))


def group_value(row: dict, column: str) -> str:
    """The group a row falls in for *column* (lists and objects as JSON; ``(none)`` where it has no value)."""
    value = cell(row.get(column))
    return value if value.strip() else "(none)"


def check_group_by(rows: Sequence[dict], column: str | None) -> None:
    """A one-line error unless some row has *column*."""
    if column is not None and not any(column in r for r in rows):
        found = sorted({k for r in rows for k in r if k != "held_out"})
        raise ValueError(f"--group-by {column}: no such column; the rows have {', '.join(found)}")


def grouped(rows: Sequence[dict], column: str, key=None) -> list[tuple[str, list[dict]]]:
    """*rows* split by their value of *column* (or by ``key(row)``), in first-seen order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(key(r) if key is not None else group_value(r, column), []).append(r)
    return list(out.items())


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-t critical value (e.g. 12.706 for 95% and df=1): ``scipy.stats.t.ppf``."""
    from scipy.stats import t

    if df < 1:
        raise ValueError("the t distribution needs df >= 1")
    return float(t.ppf(0.5 + confidence / 2, df))


def describe(scores: Sequence[float], definition: str = "torchmetrics", confidence: float = 0.95) -> dict:
    """n, mean (per *definition*), sample standard deviation and a Student-t confidence interval of the mean."""
    n = len(scores)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = float(reduce_scores(math.fsum(scores), n, definition))
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    raw = math.fsum(scores) / n
    std = statistics.stdev(scores)
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    clamp = (lambda v: max(v, 0.0)) if definition == "torchmetrics" else (lambda v: v)
    return {"n": n, "mean": mean, "std": std, "ci_low": clamp(raw - half), "ci_high": clamp(raw + half)}


def summarize(rows: Sequence[dict], confidence: float = 0.95, group_by: str | None = None) -> list[dict]:
    """Per model and definition: one line per prompt (with *group_by*: per value of that column, labelled
    ``COLUMN=VALUE``, also under ``group_by``/``group``) and one ``"(all)"`` line, plus error counts."""
    check_group_by(rows, group_by)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["definition"], r.get("prefix", "")), []).append(r)
    out = []
    for (model, definition, prefix), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        for value, group in grouped(ok, group_by or "prompt"):
            label = value if group_by is None else {"prompt": f"{group_by}={value}", "group_by": group_by,
                                                    "group": value}
            out.append({"model": model, "definition": definition, "prefix": prefix,
                        **({"prompt": label} if group_by is None else label),
                        **describe([float(r["score"]) for r in group], definition, confidence), "errors": 0})
        out.append({"model": model, "definition": definition, "prefix": prefix, "prompt": "(all)",
                    **describe([float(r["score"]) for r in ok], definition, confidence),
                    "errors": len(rs) - len(ok)})
    return out


def format_summary(summary: Sequence[dict], rows: Sequence[dict] = (), max_errors: int = 20) -> str:
    """The summary as a plain-text table, followed by the list of images that could not be scored."""
    lines = []
    by_model: dict[tuple, list[dict]] = {}
    for s in summary:
        by_model.setdefault((s["model"], s["definition"], s["prefix"]), []).append(s)
    for (model, definition, prefix), ss in by_model.items():
        lines.append(f"model {model} | {definition}: {DEFINITION_TEXT[definition]}"
                     + (f" | prefix {prefix!r}" if prefix else ""))
        head = "group" if any("group_by" in s for s in ss) else "prompt"
        width = min(48, max(len(head), *(len(s["prompt"]) for s in ss)))
        lines.append(f"  {head:<{width}}  {'n':>6}  {'mean':>9}  {'std':>8}  95% CI")
        for s in ss:
            p = s["prompt"] if len(s["prompt"]) <= width else s["prompt"][:width - 1] + "…"
            fmt = (lambda v: "   -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}")
            ci = f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]" if s["ci_low"] is not None else "-"
            mean = fmt(s["mean"])
            lines.append(f"  {p:<{width}}  {s['n']:>6}  {mean:>9}  {fmt(s['std']):>8}  {ci}")
        errs = next(s["errors"] for s in ss if s["prompt"] == "(all)")
        if errs:
            lines.append(f"  {errs} image(s) could not be scored")
    bad = [r for r in rows if r["status"] != "ok"]
    seen = set()
    uniq = [r for r in bad if not (r["image"], r["error"]) in seen and not seen.add((r["image"], r["error"]))]
    if uniq:
        lines.append(f"not scored ({len(uniq)}):")
        lines += [f"  - {r['image']}: {r['error']}" for r in uniq[:max_errors]]
        if len(uniq) > max_errors:
            lines.append(f"  ... and {len(uniq) - max_errors} more (see the output table)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def load_table(path: Path) -> list[dict]:
    """Rows of a table this module wrote (JSON or CSV), for resuming; a one-line error for anything else."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
                raise ValueError
            return list(data.get("rows", []))
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ())[:len(COLUMNS)] != COLUMNS:
                raise ValueError
            rows = []
            for r in reader:
                r["score"] = float(r["score"]) if r["score"] not in ("", None) else None
                rows.append(r)
            return rows
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{str(path)!r} exists and is not a CLIP-score table written by evaluate.py; choose another "
                         "output name or pass --overwrite to replace it") from None


def check_writable(*paths: Path | None) -> None:
    """A one-line error, before any scoring, unless each table path can be written."""
    import os
    import tempfile

    for path in paths:
        if path is None:
            continue
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        probe_dir = folder
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        try:
            if path.exists() and not os.access(path, os.W_OK):
                raise PermissionError
            with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".clipsteer-probe-"):
                pass
        except OSError:
            raise PermissionError(f"cannot write the table {str(path)!r} (the folder is read-only?); pass "
                                  "--json FILE / --csv FILE somewhere writable") from None


def write_table(rows: Sequence[dict], summary: Sequence[dict], *, json_path: Path | None = None,
                csv_path: Path | None = None, meta: dict | None = None) -> None:
    """Write the per-image table as JSON (with the summary) and/or CSV (atomically: temp file + rename)."""
    if json_path is not None:
        doc = {"format": TABLE_FORMAT, **(meta or {}), "rows": list(rows), "summary": list(summary),
               "errors": [{"image": r["image"], "model": r["model"], "error": r["error"]}
                          for r in rows if r["status"] != "ok"]}
        atomic_write(Path(json_path), json.dumps(doc, indent=1, ensure_ascii=False, default=str))
    if csv_path is not None:
        import io

        buf = io.StringIO()
        extra = extra_columns(rows, COLUMNS)
        writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, *extra], extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{k: cell(r.get(k)) for k in extra},
                             "score": "" if r["score"] is None else repr(float(r["score"]))})
        atomic_write(Path(csv_path), buf.getvalue())


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
