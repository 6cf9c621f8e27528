"""CLIP-score evaluation of generated images (torchmetrics-compatible numbers; see guidance/score.py).

    scripts/evaluate.py outputs/                       # a folder of run folders (each with run.json)
    scripts/evaluate.py outputs/run-0001               # one run folder
    scripts/evaluate.py outputs-geneval/ --group-by tag   # GenEval's layout (generate.py --export geneval)
    scripts/evaluate.py images/ --pairs pairs.csv      # a folder + CSV/JSONL of image,prompt rows
    scripts/evaluate.py images/ --pairs drawbench.csv --group-by category   # n, mean, 95% CI per category
    scripts/evaluate.py images/ --prompt "a red fox"   # every image in a folder against one caption
    scripts/evaluate.py fox.png --prompt "a red fox"   # one image
    accelerate launch --multi_gpu --num_processes 4 scripts/evaluate.py outputs/   # split over 4 GPUs
    torchrun --nproc_per_node 2 scripts/evaluate.py outputs/ --device cpu          # or CPU processes

Writes a per-image table (``--json`` / ``--csv``; for a folder by default ``clip_scores.json`` and
``clip_scores.csv`` in it; the pairs' other columns kept) and prints n, mean, std and 95% CI per prompt
(or per ``--group-by`` column value) and overall. Rerunning
resumes: images already in the table for the same model, definition and prefix are kept, not redone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guidance.errors import USER_ERRORS
from guidance.evaluation.metrics import METRIC_BASE_COLUMNS
from guidance.evaluation.pairs import collect_items
from guidance.evaluation.report import (COLUMNS, DEFINITION_TEXT, check_group_by, check_writable,
                                        format_summary, load_table, summarize, write_table)
from guidance.evaluation.scoring import evaluate, merge_rows, process_state
from guidance.score import DEFAULT_MODEL, DEFINITIONS, IMAGE_BACKENDS

EPILOG = ("definitions: " + "; ".join(f"{k} = {v}" for k, v in DEFINITION_TEXT.items())
          + ".  Exit status: 0 scored (unreadable images are listed, not fatal; with --strict they give 1), "
            "2 nothing scored or bad usage.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0], epilog=EPILOG)
    p.add_argument("path", help="an image, a run folder, a folder of run folders, a GenEval folder "
                   "(NNNNN/metadata.jsonl + samples/) or a folder of images")
    p.add_argument("--prompt", help="caption for every image (overrides run.json prompts)")
    p.add_argument("--pairs", metavar="FILE", help="CSV (header image,prompt) or JSONL of image/prompt pairs; "
                   "image paths relative to PATH")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help=f"CLIP Hub id, local folder or open_clip:ARCH/PRETRAINED; repeatable (default {DEFAULT_MODEL})")
    p.add_argument("--models", nargs="+", default=[], metavar="MODEL", help="several models at once")
    p.add_argument("--metric", action="append", default=[], metavar="NAME[:MODEL]",
                   help="score with these metrics instead, one column each: clip_score[:CLIP], pickscore, hps, "
                        "imagereward, aesthetic (each NAME[:MODEL], a Hub id, local folder or file), or toy_judge "
                        "(toy world v3's judging rule: 1 right, 0 wrong, reported per category); repeatable; "
                        "writes metrics.json / metrics.csv")
    p.add_argument("--held-out", action="store_true",
                   help="with --metric: report separately the images whose run a metric did not steer (read "
                        "from run.json), to expose reward hacking")
    p.add_argument("--group-by", metavar="COLUMN",
                   help="report n, mean and 95%% CI per value of this column (a pairs file's column such as "
                        "DrawBench's category, GenEval's tag, or seed/backend) instead of per prompt")
    p.add_argument("--definition", default="torchmetrics", choices=DEFINITIONS,
                   help="which CLIP score (default torchmetrics, as torchmetrics 1.9 computes it)")
    p.add_argument("--prefix", default="", help="text put before every caption ('A photo depicts ' for Hessel et al.)")
    p.add_argument("--json", metavar="FILE", help="write the table and summary as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the table as CSV")
    p.add_argument("--overwrite", action="store_true", help="start the output tables afresh instead of resuming")
    p.add_argument("--batch-size", type=int, default=32, help="images per CLIP batch (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (accelerate decides under "
                   "`accelerate launch`)")
    p.add_argument("--precision", default="fp32", help="fp32 (default), bf16 or fp16; half precision changes "
                   "the numbers slightly")
    p.add_argument("--image-backend", default="torchvision", choices=IMAGE_BACKENDS,
                   help="image processor: torchvision (transformers 5 / torchmetrics default) or pil (transformers 4)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any image could not be scored")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    state = process_state(args.device)
    main_proc = state is None or state.is_main_process
    if args.metric:
        return _main_metrics(args, main_proc)
    if args.held_out:
        print("evaluate.py: error: --held-out goes with --metric", file=sys.stderr)
        return 2
    try:
        models = list(dict.fromkeys(args.model + args.models)) or [DEFAULT_MODEL]
        items, json_path, csv_path = _items_and_tables(args, "clip_scores")
        old: list[dict] = []
        if not args.overwrite:  # resume; load_table refuses files it did not write
            tables = [load_table(p) for p in (json_path, csv_path) if p is not None and p.exists()]
            old = tables[0] if tables else []
        rows = evaluate(items, models, definition=args.definition, prefix=args.prefix, batch_size=args.batch_size,
                        device=args.device, precision=args.precision, image_backend=args.image_backend,
                        done=old, show_progress=not args.no_progress)
    except USER_ERRORS as err:
        if main_proc:
            print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    if not main_proc:
        return 0
    rows = merge_rows(rows, old)
    summary = summarize(rows, group_by=args.group_by)
    write_table(rows, summary, json_path=json_path, csv_path=csv_path,
                meta={"definition": args.definition, "definition_text": DEFINITION_TEXT[args.definition],
                      "models": models, "prefix": args.prefix, "image_backend": args.image_backend,
                      "precision": args.precision})
    print(format_summary(summary, rows))
    return _finish(rows, (json_path, csv_path), args.strict)


def _resolve_steered_by(items) -> None:
    """What steered each run, with the models its run.json records relative to its folder (or by its
    preset's name) resolved, so --held-out compares them with the metrics' models."""
    from generators.runs.record import RunRecord
    from guidance.evaluation.pairs import SIDECAR, steered_by

    for item in items:
        sidecar = item.path.parent / SIDECAR if item.path is not None else None
        if "steered_by" not in item.extra or sidecar is None or not sidecar.is_file():
            continue
        try:
            record = RunRecord.read(sidecar)
        except (OSError, ValueError):
            continue
        item.extra["steered_by"] = steered_by(record.to_dict(), record.resolved_settings(sidecar.parent))


def _items_and_tables(args, stem: str):
    """The pairs to score and the table paths (``<folder>/<stem>.json``/``.csv`` by default), checked to be
    writable before any scoring, so scores are never lost to a read-only folder."""
    if args.prompt is not None and args.pairs is not None:
        raise ValueError("give --prompt or --pairs, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty; give the caption to score against")
    items, root = collect_items(args.path, prompt=args.prompt, pairs=args.pairs)
    _resolve_steered_by(items)
    check_group_by([{**dict.fromkeys((*COLUMNS, *METRIC_BASE_COLUMNS)), **it.columns} for it in items], args.group_by)
    json_path = Path(args.json) if args.json else None
    csv_path = Path(args.csv) if args.csv else None
    if json_path is None and csv_path is None and Path(args.path).is_dir():
        json_path, csv_path = root / f"{stem}.json", root / f"{stem}.csv"
    check_writable(json_path, csv_path)
    return items, json_path, csv_path


def _finish(rows, paths, strict: bool) -> int:
    """Say where the tables went; exit 2 when nothing was scored, 1 with --strict when anything failed."""
    for path in paths:
        if path is not None:
            print(f"wrote {path}")
    n_ok = sum(r["status"] == "ok" for r in rows)
    if n_ok == 0:
        return 2
    return 1 if strict and n_ok < len(rows) else 0


def _main_metrics(args, main_proc: bool) -> int:
    """--metric: one column per metric (CLIP score and reward models), --held-out split."""
    from guidance.evaluation.metrics import evaluate_metrics, format_metric_summary, summarize_metrics, write_metric_table

    try:
        if args.model or args.models:
            raise ValueError("--model goes with the CLIP-score table; with --metric write clip_score:MODEL")
        metrics = list(dict.fromkeys(m.strip() for m in args.metric))
        items, json_path, csv_path = _items_and_tables(args, "metrics")
        rows = evaluate_metrics(items, metrics, batch_size=args.batch_size, device=args.device,
                                precision=args.precision, show_progress=not args.no_progress and main_proc)
    except USER_ERRORS as err:
        if main_proc:
            print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    if not main_proc:
        return 0
    summary = summarize_metrics(rows, metrics, held_out=args.held_out, group_by=args.group_by)
    write_metric_table(rows, summary, metrics, json_path=json_path, csv_path=csv_path,
                       meta={"held_out": args.held_out, "precision": args.precision})
    print(format_metric_summary(summary, rows))
    return _finish(rows, (json_path, csv_path), args.strict)


if __name__ == "__main__":
    sys.exit(main())
