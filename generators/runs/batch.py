"""Batch generation: every prompt of a file x every seed, one run folder each, one index for the batch.

    generate.py --prompts-file prompts.txt --seeds 0-3 --preset toy --out outputs/bench
    accelerate launch --multi_gpu --num_processes 4 scripts/generate.py --prompts-file prompts.csv --seeds 0-3 ...

:func:`run_batch` calls the Python API (:func:`generators.runs.session.generate`) once per prompt x seed. The
prompts file is text (one prompt a line), CSV/TSV (a ``prompt`` column, optional per-row options such as
``seed``/``seeds``, ``backend`` or any option name) or JSONL (objects with ``prompt``; other keys are kept,
e.g. GenEval's ``tag`` and ``include``). Row *r* (0-based, blank lines not counted) with seed *s* is one job.

- **Index**: ``<out>/runs.jsonl``, one line per job (row, prompt, seed, folder, images, score, status, error,
  options fingerprint). Each process appends to its own ``runs.rank-<R>.jsonl`` as it goes; the main
  process merges them into ``runs.jsonl`` (latest attempt per row x seed wins) at the end; the next batch
  reads (and then merges) any shard a dead process left, so nothing is lost.
- **Processes**: under ``accelerate launch`` / ``torchrun`` the jobs left to do are split by accelerate's
  ``PartialState.split_between_processes`` (CPU processes use gloo); each run is seeded by its own seed
  only, so the images equal a single-process batch.
- **Resuming**: a job whose index line says ``ok`` for the same prompt and options, with its images on disk,
  is skipped; an ``interrupted`` one continues from its checkpoint when it has one; others are redone. A
  failing job is recorded with its one-line error and the batch goes on.
- **Exports** (:func:`export`): GenEval's ``<row:05d>/metadata.jsonl + samples/NNNN.png`` and a flat folder
  with ``captions.csv`` (``image,prompt``) that ``scripts/evaluate.py DIR --pairs DIR/captions.csv`` reads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guidance.errors import USER_ERRORS

from ..base import check_seed
from .export import LAYOUTS, export_runs

INDEX = "runs.jsonl"
SHARD_GLOB = "runs.rank-*.jsonl"
PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")
# generate() arguments a row may give besides run and backend options
ROW_ARGUMENTS = ("backend", "preset", "config")
# options that do not change the images, left out of a job's fingerprint
NOT_FINGERPRINTED = ("out", "progress", "threads", "device", "checkpoint_every", "seed", "record_paths")


@dataclass
class Row:
    """One row of a prompts file: its prompt, its own seeds (``None``: the batch's), its options for
    ``generate()`` and the whole record as read (kept for exports such as GenEval's metadata)."""

    index: int
    prompt: str
    seeds: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    source: str = ""              # where it came from, for messages: "prompts.csv row 2"


@dataclass
class BatchResult:
    """What :func:`run_batch` hands back (on every process; ``entries`` complete on the main one)."""

    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    interrupted: bool = False
    index: Path | None = None
    entries: list[dict] = field(default_factory=list)
    exported: Path | None = None


# ---------------------------------------------------------------------------------------------
# Reading the input
# ---------------------------------------------------------------------------------------------

#: the most seeds one --seeds value may name (a batch of more is a mistake, or is split into several batches)
MAX_SEEDS = 100_000


def parse_seeds(text: Any, name: str = "--seeds") -> list[int]:
    """``"0-3"`` (a range, both ends included), ``"0,2,5"`` (a list) or ``"7"`` -> seeds, in order; at most
    :data:`MAX_SEEDS` of them, counted before any range is expanded (linear time in the seeds named)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return [check_seed(text, name)]
    if isinstance(text, (list, tuple)):
        parts = [str(t) for t in text]
    else:
        parts = str(text).replace(" ", "").split(",")
    spans: list[tuple[int, int]] = []
    count = 0
    for part in parts:
        low, dash, high = part.partition("-")
        try:
            if dash and low:
                first, last = check_seed(low, name), check_seed(high, name)
                if last < first:
                    raise ValueError(f"{name} range {part!r} runs backwards; write it low-high, e.g. 0-3")
            else:
                first = last = check_seed(part, name)
        except ValueError as err:
            if "backwards" in str(err):
                raise
            raise ValueError(f"{name} {text!r} is not a seed list: give a range (0-3), a list (0,2,5) or one seed") \
                from None
        spans.append((first, last))
        count += last - first + 1
        if count > MAX_SEEDS:
            shown = str(text) if len(str(text)) <= 40 else str(text)[:37] + "..."
            raise ValueError(f"{name} {shown!r} names more than {MAX_SEEDS} seeds; give at most {MAX_SEEDS} "
                             "(split a larger batch into several --seeds ranges, one batch each)")
    seeds: list[int] = []
    seen: set[int] = set()
    for first, last in spans:
        for seed in range(first, last + 1):
            if seed in seen:
                raise ValueError(f"{name} {text!r} names seed {seed} twice; each seed gives one run")
            seen.add(seed)
            seeds.append(seed)
    return seeds


def _option_names() -> dict[str, str]:
    from .options import option_specs

    return {alias: spec.name for spec in option_specs().values() for alias in spec.names}


def read_prompts(path: str | Path) -> list[Row]:
    """The rows of a prompts file (text, CSV/TSV, JSONL or a JSON array), or a one-line error for a missing or
    empty file or a table without a prompt column. Columns that are not options are kept in ``record`` only
    (with a warning)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"prompts file {str(path)!r} is a folder; give a text, CSV or JSONL file of prompts")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist; give a text, CSV or JSONL file of prompts")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    suffix = path.suffix.lower()
    where = f"prompts file {str(path)!r}"
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        prompt_col = next((columns[c] for c in PROMPT_COLUMNS if c in columns), None)
        if prompt_col is None:
            raise ValueError(f"{where} has no prompt column; its header row must name one of "
                             f"{', '.join(PROMPT_COLUMNS)} (found {list(reader.fieldnames or [])})")
        records = []
        for record in reader:
            if None in record:
                raise ValueError(f"{where} line {reader.line_num} has more cells than the header "
                                 "(quote prompts that contain commas)")
            records.append(({k.strip(): (v or "").strip() for k, v in record.items()}, prompt_col.strip()))
    elif suffix in (".jsonl", ".ndjson", ".json"):
        if suffix == ".json":           # one JSON array of objects (or of prompt strings)
            try:
                items = json.loads(text) if text.strip() else []
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON ({err.msg} at line {err.lineno})") from None
            if not isinstance(items, list):
                raise ValueError(f"{where} must hold a JSON array of objects with a \"prompt\" key")
            numbered = [(n, item if not isinstance(item, str) else {"prompt": item}) for n, item in enumerate(items, 1)]
        else:
            numbered = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where} line {n} is not valid JSON ({err.msg})") from None
        records, unit = [], "item" if suffix == ".json" else "line"
        for n, record in numbered:
            if not isinstance(record, dict):
                raise ValueError(f"{where} {unit} {n} is not a JSON object with a \"prompt\" key")
            key = next((k for k in record if k.strip().lower() in PROMPT_COLUMNS), None)
            if key is None:
                raise ValueError(f"{where} {unit} {n} has no \"prompt\" key")
            records.append((record, key))
    else:
        records = [({"prompt": line.strip()}, "prompt") for line in text.splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{where} has no prompts; write one prompt a line (or rows of a CSV/JSONL file)")
    aliases = _option_names()
    rows, unknown = [], set()
    for i, (record, prompt_key) in enumerate(records):
        prompt = record[prompt_key]
        row = Row(i, prompt.strip() if isinstance(prompt, str) else prompt, record=dict(record),
                  source=f"{path.name} row {i}")
        for key, value in record.items():
            norm = key.strip().lower().lstrip("-").replace("-", "_")
            if key == prompt_key or value in ("", None):
                continue
            if norm in ("seed", "seeds"):
                row.seeds = parse_seeds(value, f"row {i} seed")
            elif norm in ROW_ARGUMENTS:
                row.options[norm] = value
            elif norm in aliases:
                row.options[aliases[norm]] = value
            else:
                unknown.add(key)
        rows.append(row)
    if unknown:
        warnings.warn(f"{path.name}: column(s) {', '.join(sorted(unknown))} are not options; used only in "
                      "--export geneval's metadata.jsonl", stacklevel=2)
    return rows


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------

def fingerprint(options: dict[str, Any]) -> str:
    """A short hash of the options that decide a job's images (not where it goes or how it is shown)."""
    from .outputs import to_jsonable

    kept = {k: v for k, v in options.items() if k not in NOT_FINGERPRINTED and v is not None}
    return hashlib.sha256(json.dumps(to_jsonable(kept), sort_keys=True).encode()).hexdigest()[:16]


def _read_lines(path: Path) -> list[dict]:
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:        # a line cut short by a crash: that job is simply redone
            continue
        if isinstance(entry, dict) and "row" in entry and "seed" in entry:
            entries.append(entry)
    return entries


def read_index(out: str | Path) -> dict[tuple[int, int], dict]:
    """The latest entry per (row, seed) in ``runs.jsonl`` and any shards not merged yet."""
    out = Path(out)
    paths = ([out / INDEX] if (out / INDEX).is_file() else []) + sorted(out.glob(SHARD_GLOB))
    latest: dict[tuple[int, int], dict] = {}
    for path in paths:
        for entry in _read_lines(path):
            key = (int(entry["row"]), int(entry["seed"]))
            if key not in latest or entry.get("time", 0) >= latest[key].get("time", 0):
                latest[key] = entry
    return latest


def merge_index(out: str | Path) -> Path:
    """Fold the shards into ``runs.jsonl`` (written whole, then moved into place), then remove them."""
    out = Path(out)
    shards = sorted(out.glob(SHARD_GLOB))
    entries = sorted(read_index(out).values(), key=lambda e: (int(e["row"]), int(e.get("order", 0)), int(e["seed"])))
    tmp = out / (INDEX + ".tmp")
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    os.replace(tmp, out / INDEX)
    for shard in shards:
        shard.unlink()
    return out / INDEX


def _finished(entry: dict | None, prompt: str, options: str, out: Path) -> bool:
    return bool(entry) and entry.get("status") == "ok" and entry.get("prompt") == prompt \
        and entry.get("options") == options and bool(entry.get("images")) \
        and all((out / p).is_file() for p in entry["images"])


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    row: Row
    seed: int
    order: int            # the seed's position in the row's seed list (sample number in exports)
    options: dict[str, Any]
    fingerprint: str


def plan(rows: list[Row], seeds: list[int], common: dict[str, Any]) -> list[Job]:
    """Every row x seed, with the options of each run (the row's over the batch's)."""
    jobs = []
    for row in rows:
        options = {**common, **row.options}
        for order, seed in enumerate(row.seeds if row.seeds is not None else seeds):
            jobs.append(Job(row, seed, order, options, fingerprint({**options, "seed": seed})))
    return jobs


def _run_job(job: Job, out: Path, previous: dict | None, progress: bool, device: str | None) -> dict:
    """Run one job and return its index entry (errors become an ``error`` entry, never an exception)."""
    from guidance.errors import first_line

    from .checkpoint import CHECKPOINT_JSON
    from .session import generate

    started = time.time()
    entry = {"row": job.row.index, "order": job.order, "prompt": job.row.prompt, "seed": job.seed,
             "options": job.fingerprint}
    extra = {"device": device} if device is not None and "device" not in job.options else {}
    resume = None
    if previous and previous.get("status") == "interrupted" and previous.get("options") == job.fingerprint \
            and previous.get("folder") and (out / previous["folder"] / CHECKPOINT_JSON).is_file():
        resume = out / previous["folder"]          # continue it: the same image as an uninterrupted run
    try:
        _check_row(job.row)
        if resume is not None:
            run = generate(resume=resume, out=str(out), progress=progress, **extra)
        else:
            options = {k: v for k, v in job.options.items() if k not in ("out", "progress", "seed")}
            run = generate(job.row.prompt, seed=job.seed, out=str(out), progress=progress, **{**options, **extra})
    except KeyboardInterrupt:
        raise
    except Exception as err:        # a bad row or an out-of-memory error: recorded, the batch goes on
        return {**entry, "status": "error", "error": f"{err.__class__.__name__}: {first_line(err, 300)}",
                "folder": None, "images": [], "score": None, "seconds": round(time.time() - started, 3),
                "time": time.time()}
    return {**entry, "status": "interrupted" if run.interrupted else "ok", "error": None,
            "folder": run.path.relative_to(out).as_posix(),
            "images": [p.relative_to(out).as_posix() for p in run.image_paths], "score": run.clip_score,
            "backend": run.metadata.get("backend"), "seconds": round(time.time() - started, 3),
            "resumed_from": str(resume.relative_to(out).as_posix()) if resume is not None else None,
            "time": time.time()}


def _check_row(row: Row) -> None:
    """The row's own options typed and checked, a bad one named by its file and row (not "arguments")."""
    from .options import coerce, option_specs

    specs = option_specs()
    for name, value in row.options.items():
        if name in specs:
            coerce(specs[name], value, row.source or f"row {row.index}")


def run_batch(prompts_file: str | Path, *, seeds: Any = None, out: str | Path = "outputs", export: str | None = None,
              export_dir: str | Path | None = None, **options) -> BatchResult:
    """Run every prompt of *prompts_file* with every seed (see the module docstring); ``options`` are
    :func:`generators.runs.session.generate` options for every run (``backend=``, ``preset=``, ``iterations=``...).
    Shards over the processes of ``accelerate launch``; returns the counts and (main process) the index."""
    from guidance.evaluation.scoring import process_state

    if options.get("resume") is not None:
        raise ValueError("--resume continues one run; a batch resumes by itself when run again")
    if options.get("prompt") is not None:
        raise ValueError("give prompts either on the command line or in --prompts-file, not both")
    if seeds is not None and options.get("seed") is not None:
        raise ValueError("give --seeds (for the batch) or --seed, not both")
    seed_list = parse_seeds(seeds if seeds is not None else options.get("seed", 0))
    if export is not None and export not in LAYOUTS:
        raise ValueError(f"unknown export layout {export!r}; choose {' or '.join(LAYOUTS)}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output location {str(out)!r} is a file; give a folder with --out")
    rows = read_prompts(prompts_file)
    common = {k: v for k, v in options.items() if v is not None and k not in ("seed", "prompt")}
    _check_options(common)
    destination = None
    if export is not None:
        destination = Path(export_dir).expanduser() if export_dir else out.with_name(f"{out.name}-{export}")
        if destination.exists() and not destination.is_dir():
            raise ValueError(f"export folder {str(destination)!r} is a file; give a folder with --export-dir")
    jobs = plan(rows, seed_list, common)

    state = process_state(options.get("device"))
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    main_process = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    before = read_index(out)
    if state is not None:
        state.wait_for_everyone()        # every process has read the index before any writes to it
    todo = [j for j in jobs if not _finished(before.get((j.row.index, j.seed)), j.row.prompt, j.fingerprint, out)]
    result = BatchResult(total=len(jobs), skipped=len(jobs) - len(todo))
    show = bool(options.get("progress", True)) and main_process
    if main_process:
        where = f" on {world} processes" if world > 1 else ""
        print(f"batch: {len(rows)} prompt(s) x seeds = {len(jobs)} run(s); {result.skipped} already done "
              f"(skipped), {len(todo)} to do{where}", file=sys.stderr)
    device = str(state.device) if state is not None and options.get("device") in (None, "auto") else None
    if state is None:
        mine = todo
    else:
        with state.split_between_processes(todo) as part:
            mine = list(part)
    shard = out / f"runs.rank-{rank}.jsonl"
    from tqdm.auto import tqdm

    label, skipped = ("batch", result.skipped) if world == 1 else (f"batch (process {rank + 1} of {world})", 0)
    with tqdm(total=len(mine) + skipped, initial=skipped, desc=label, unit="run", disable=not show,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for job in mine:
            try:
                entry = _run_job(job, out, before.get((job.row.index, job.seed)), show, device)
            except KeyboardInterrupt:
                result.interrupted = True
                break
            with open(shard, "a", encoding="utf-8") as fh:       # one line per job, written as it finishes
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            result.ok += entry["status"] == "ok"
            if entry["status"] == "error":
                result.failed += 1
                bar.write(f"row {job.row.index} seed {job.seed}: {entry['error']}", file=sys.stderr)
            bar.update(1)
            bar.set_postfix({"ok": result.ok, "failed": result.failed}, refresh=False)
            if entry["status"] == "interrupted":
                result.interrupted = True
                break
    if state is not None:
        state.wait_for_everyone()
    if main_process:
        result.index = merge_index(out)
        latest = read_index(out)
        result.entries = [latest[key] for key in ((j.row.index, j.seed) for j in jobs) if key in latest]
        result.failed = sum(e["status"] == "error" for e in result.entries)   # every process's rows
        result.ok = sum(e["status"] == "ok" for e in result.entries) - result.skipped
        if destination is not None and not result.interrupted:
            result.exported = export_runs(result.entries, rows, out, destination, export)
    if state is not None:
        state.wait_for_everyone()
    return result


def _check_options(common: dict[str, Any]) -> None:
    """The batch's own options, checked once before any run (a bad one would fail every row)."""
    from .options import resolve_options

    args = {k: v for k, v in common.items() if k not in ROW_ARGUMENTS}
    with warnings.catch_warnings():     # each run warns about options it does not use; once is enough
        warnings.simplefilter("ignore")
        resolve_options("check", **{k: common.get(k) for k in ROW_ARGUMENTS}, **args)


# ---------------------------------------------------------------------------------------------
# Command line (called by generators.cli for --prompts-file)
# ---------------------------------------------------------------------------------------------

def main(args: dict[str, Any]) -> int:
    """``generate.py --prompts-file FILE [--seeds S] [--export LAYOUT [--export-dir DIR]] ...``: exit 0 when
    every run is done, 1 when a row failed (the main process; it reports for all), 2 on bad input, 130 when
    interrupted."""
    args = dict(args)
    prompts_file = args.pop("prompts_file")
    seeds, export, export_dir = args.pop("seeds", None), args.pop("export", None), args.pop("export_dir", None)
    try:
        result = run_batch(prompts_file, seeds=seeds, export=export, export_dir=export_dir, **args)
    except USER_ERRORS as err:
        if int(os.environ.get("RANK", "0") or 0) == 0:        # said once, not by every process
            print(f"error: {err}", file=sys.stderr)
        return 2
    if result.index is None:          # another process of an accelerate launch: the main one reports
        return 130 if result.interrupted else 0
    done = result.ok + result.skipped
    print(f"{done} of {result.total} run(s) done ({result.skipped} skipped as finished, {result.ok} new), "
          f"{result.failed} failed; index {result.index}")
    if result.exported is not None:
        print(f"exported to {result.exported}")
    if result.interrupted:
        return 130
    return 1 if result.failed else 0


__all__ = ["Row", "BatchResult", "Job", "parse_seeds", "read_prompts", "read_index", "merge_index", "plan",
           "fingerprint", "run_batch", "main", "INDEX", "MAX_SEEDS"]
