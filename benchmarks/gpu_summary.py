"""The summary table of ``benchmarks/gpu_check.sh``: one row per figure, read from the JSON files it wrote.

    python benchmarks/gpu_summary.py OUT_DIR        # prints the table, writes OUT_DIR/summary.md and summary.json

Each row names the figure, clipsteer's value, the competitor's (when it ran), their same-run ratio and the
peak memory (CUDA: peak allocated; CPU: peak RSS). A figure whose JSON is missing or holds an error shows
that instead of numbers. Exit status 1 when any expected figure is missing or failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"error": f"{path.name}: {err.__class__.__name__}"}


def _mem(row: dict) -> str:
    for key, unit in (("cuda_max_allocated_mb", "GPU"), ("cuda_peak_mb", "GPU"), ("peak_rss_mb", "RSS")):
        if row.get(key) is not None:
            return f"{row[key] / 1024:.2f} GB {unit}"
    return ""


def _speed_rows(report: dict, label: str) -> list[dict]:
    if "error" in report:
        return [{"figure": label, "error": report["error"]}]
    rows = []
    for r in report.get("results", []):
        if "error" in r:
            rows.append({"figure": f"{label}: {' '.join(r.get('args', [])[:4])}", "error": r["error"]})
            continue
        name = f"{label}, {r['impl']} {r.get('precision', 'fp32')}"
        if r["case"] == "vqgan":
            row = {"figure": f"{r['size']}², {r['cutn']} cuts: {name}", "unit": "it/s",
                   "clipsteer": 1 / r["median_s"], "memory": _mem(r)}
            if "compile_speedup" in r:
                row["ratio"] = r["compile_speedup"]
                row["note"] = "ratio: compiled over eager, same run"
            rows.append(row)
        elif r["case"] == "sd":
            for variant, v in r["variants"].items():
                rows.append({"figure": f"{r['size']}² SD step: {name} {variant}", "unit": "s/step",
                             "clipsteer": v["median_s"], "memory": _mem(r)})
    return rows


def _vqgan_competitor_rows(report: dict) -> list[dict]:
    if "error" in report:
        return [{"figure": "VQGAN+CLIP vs nerdyrodent", "error": report["error"]}]
    ours, theirs = report["clipsteer"], report["nerdyrodent"]
    options = " ".join(report.get("clipsteer_options", [])) or "fp32"
    return [{"figure": f"VQGAN+CLIP {report['size']}² vs nerdyrodent generate.py (clipsteer {options})",
             "unit": "it/s", "clipsteer": 1 / ours["s_per_step"], "competitor": 1 / theirs["s_per_step"],
             "ratio": report["speedup"], "memory": f"{_mem(ours)} / {_mem(theirs)}"}]


def _sd_competitor_rows(report: dict) -> list[dict]:
    if "error" in report:
        return [{"figure": "guided SD", "error": report["error"]}]
    rows = []
    community = report.get("community")
    for impl in ("clipsteer-full", "clipsteer-x0", "clipsteer-x0-tiny-vae"):
        if impl not in report:
            continue
        r = report[impl]
        row = {"figure": f"guided SD {report['size']}², {report['steps'][1]} steps, {report['precision']}: {impl}",
               "unit": "s/image", "clipsteer": r["s_per_image"], "memory": _mem(r)}
        if community:
            row.update(competitor=community["s_per_image"], ratio=report[f"speedup_{impl}"],
                       memory=f"{_mem(r)} / {_mem(community)}")
        rows.append(row)
    return rows


def _score_rows(report: dict) -> list[dict]:
    if "error" in report:
        return [{"figure": "CLIP score", "error": report["error"]}]
    res = report["results"]
    return [{"figure": f"CLIP score {report['arch']}, {report['images']} images: clip_score vs torchmetrics "
                       f"CLIPScore update+compute", "unit": "images/s",
             "clipsteer": res["clipsteer_clip_score"]["images_per_s"],
             "competitor": res["torchmetrics_update_compute"]["images_per_s"],
             "ratio": report["speedup_wall"]["clip_score_vs_torchmetrics_update"],
             "note": f"max |score diff| per pair {report['max_abs_diff_per_pair']:.2g}"}]


def _noise_rows(report: dict) -> list[dict]:
    if "error" in report:
        return [{"figure": "noise backend", "error": report["error"]}]
    rows = []
    for r in report["results"]:
        steps = r["seconds_per_step"][1:] or r["seconds_per_step"]     # the first step warms up
        mem = f"{r['cuda_peak_gb']:.2f} GB GPU" if "cuda_peak_gb" in r else f"{r['peak_rss_gb']:.2f} GB RSS"
        rows.append({"figure": f"noise backend {r['size']}², render steps {r['render_steps']}, checkpointing "
                               f"{'on' if r['checkpointing'] else 'off'}: one optimisation step", "unit": "s/step",
                     "clipsteer": sum(steps) / len(steps), "memory": mem})
    return rows


# file name -> how its rows are read; optional files (competitors not given) may be absent
FIGURES = [("vqgan_fp32.json", _speed_rows, "VQGAN+CLIP, speed.py fp32 run"),
           ("vqgan_bf16.json", _speed_rows, "VQGAN+CLIP, speed.py bf16 run"),
           ("vqgan_nerdyrodent.json", _vqgan_competitor_rows, None), ("sd.json", _sd_competitor_rows, None),
           ("score_vit_b_32.json", _score_rows, None), ("score_vit_l_14.json", _score_rows, None),
           ("noise.json", _noise_rows, None)]
OPTIONAL = {"vqgan_nerdyrodent.json"}


def summarise(folder: Path) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    for name, read, label in FIGURES:
        path = folder / name
        if not path.exists():
            if name not in OPTIONAL:
                problems.append(f"{name} missing")
            continue
        report = _load(path)
        try:
            got = read(report, label) if label else read(report)
        except (KeyError, TypeError, ZeroDivisionError, IndexError) as err:
            got = [{"figure": name, "error": f"unreadable ({err.__class__.__name__}: {err})"}]
        problems += [f"{r['figure']}: {r['error']}" for r in got if "error" in r]
        rows += got
    return rows, problems


def table(rows: list[dict]) -> str:
    def num(v):
        return "" if v is None else f"{v:.3g}"

    lines = ["| figure | unit | clipsteer | competitor | ratio | peak memory (clipsteer / competitor) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['figure']} | | FAILED: {r['error']} | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['figure']}{note} | {r['unit']} | {num(r.get('clipsteer'))} | {num(r.get('competitor'))} "
                     f"| {ratio} | {r.get('memory', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    rows, problems = summarise(folder)
    text = table(rows)
    print(text)
    (folder / "summary.md").write_text(text + "\n")
    (folder / "summary.json").write_text(json.dumps({"rows": rows, "problems": problems}, indent=1) + "\n")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
