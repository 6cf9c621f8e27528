"""Batch CLIP-score evaluation: find image-caption pairs, score them, tabulate and summarise.

Used by ``scripts/evaluate.py``. Pairs come from run folders written by ``scripts/generate.py``
(their ``run.json`` sidecar: ``prompt`` + ``image``), GenEval's folder layout (``NNNNN/metadata.jsonl``
+ ``NNNNN/samples/*.png``, as ``generate.py --export geneval`` writes it), a CSV/JSONL file of
``image,prompt`` rows, or one caption for every image. The other columns of a pairs file or of
GenEval's metadata (DrawBench's ``category``, GenEval's ``tag``) stay in the output rows, and the
summaries can be grouped by any column (``group_by``). Bad inputs (missing or corrupt files, bad rows) become error rows
that are listed, never a stop. Work splits over processes with accelerate
(``split_between_processes`` + ``gather_object``); only the main process writes.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .images import read_image
from .score import DEFINITIONS, ScoreModel, pair_scores, reduce_scores

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIDECAR = "run.json"
TABLE_FORMAT = "clipsteer-clip-scores/1"
COLUMNS = ("image", "prompt", "model", "definition", "prefix", "score", "status", "error", "seed", "backend")

DEFINITION_TEXT = {
    "torchmetrics": "torchmetrics 1.9: per image 100*cos, mean = max(mean of 100*cos, 0)",
    "per_pair": "per pair: per image 100*max(cos, 0), plain mean",
    "hessel": "Hessel et al. 2021: per image 2.5*max(cos, 0), plain mean",
}


@dataclass
class Item:
    """One image-caption pair to score (or a problem found while collecting pairs)."""

    image: str                       # the image as named in the table (relative to the evaluated root)
    path: Path | None                # the file to read
    prompt: str | None
    error: str | None = None         # set when the pair cannot be scored
    extra: dict = field(default_factory=dict)  # seed, backend from run.json
    columns: dict = field(default_factory=dict)  # the pairs file's / GenEval metadata's other columns

    @property
    def key(self) -> tuple[str, str]:
        return (self.image, self.prompt or "")


# ---------------------------------------------------------------------------------------------
# Collecting pairs
# ---------------------------------------------------------------------------------------------

def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _run_by_product(path: Path) -> bool:
    """True for a run folder's frames (``frames/*.png``) and animations (``animation.*``)."""
    if path.stem == "animation" and (path.parent / SIDECAR).is_file():
        return True
    return path.parent.name == "frames" and (path.parent.parent / SIDECAR).is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files under *folder* (recursive), sorted, skipping hidden folders and the frames and
    animations of run folders (only a run's final images are results)."""
    return sorted(p for p in folder.rglob("*") if _is_image(p) and not _run_by_product(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))


def read_run(folder: Path, root: Path) -> list[Item]:
    """Pairs from one run folder's ``run.json`` (``prompt`` + ``image``/``images``, as
    ``generators.runs`` writes it; read defensively: per-image records or a list of records are
    accepted too). Weighted prompts are scored against :func:`caption_of` them."""
    sidecar = folder / SIDECAR
    name = _rel(sidecar, root)
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [Item(name, None, None, f"{name} is not valid JSON ({err.__class__.__name__}); fix or remove it")]
    records = data if isinstance(data, list) else [data]
    items: list[Item] = []
    for r, rec in enumerate(records):
        where = name if len(records) == 1 else f"{name} record {r}"
        if not isinstance(rec, dict):
            items.append(Item(where, None, None, f"{where} is not a JSON object with 'prompt' and 'image' keys"))
            continue
        prompt = rec.get("prompt")
        images = rec.get("images") if isinstance(rec.get("images"), list) else rec.get("image", rec.get("images"))
        if images is None:
            items.append(Item(where, None, None, f"{where} has no 'image' key; cannot tell which file to score"))
            continue
        images = images if isinstance(images, list) else [images]
        prompts = prompt if isinstance(prompt, list) and len(prompt) == len(images) else [prompt] * len(images)
        extra = {k: rec.get(k) for k in ("seed", "backend") if rec.get(k) is not None}
        extra["steered_by"] = steered_by(rec)
        scored = run_caption(rec)
        for img, p in zip(images, prompts):
            if isinstance(img, dict):  # {"image"/"path": ..., "prompt": ..., "seed": ...}
                p = img.get("prompt", p)
                extra_i = {**extra, **{k: img[k] for k in ("seed", "backend") if img.get(k) is not None}}
                img = img.get("image", img.get("path"))
            else:
                extra_i = extra
            if not isinstance(img, str) or not img:
                items.append(Item(where, None, None, f"{where}: 'image' entry {img!r} is not a file name"))
                continue
            path = Path(img) if Path(img).is_absolute() else folder / img
            label = _rel(path, root)
            if scored is not None:       # a clipsteer run: the caption generate.py scored it against
                caption, reason = scored
                items.append(Item(label, path, caption, None if caption else f"not scorable: {reason}", extra_i))
                continue
            if not isinstance(p, str) or not p.strip():
                items.append(Item(label, path, None, f"{where} has no 'prompt' for {img!r}", extra_i))
                continue
            items.append(Item(label, path, caption_of(p), None, extra_i))
    return items


def steered_by(record: dict, settings: dict | None = None) -> list[str]:
    """What steered a clipsteer run, from its run.json: ``clip:MODEL`` for each guiding CLIP and the
    name of each reward with a non-zero weight (``steered_by``). Empty for other sidecars. *settings*:
    the record's settings with their paths made usable again (run.json records them relative to the run
    folder; ``generators.runs.record.resolved_settings``), else the record's own."""
    from .encoders import parse_encoder_spec

    if settings is None:
        settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    clips = [c for c in (settings.get("clip") or []) if isinstance(c, str) and c.strip().lower() not in ("none", "off")]
    out = [f"clip:{parse_encoder_spec(c)[0]}" for c in clips]
    out += [str(r) for r in (record.get("steered_by") or []) if isinstance(r, str)]
    return out


def run_caption(record: dict) -> tuple[str | None, str] | None:
    """For a clipsteer run.json (with its ``prompts`` schedule): ``(caption, "")`` -- the positive text
    prompts active at the run's last step, joined with ", ", exactly what ``generate.py`` scored -- or
    ``(None, reason)`` when the run has no such prompt. ``None`` for other sidecars."""
    schedule = record.get("prompts")
    if not isinstance(schedule, dict) or not schedule:
        return None
    try:
        entries = {int(k): v for k, v in schedule.items()}
    except (TypeError, ValueError):
        return None
    last = max(int(record.get("steps_done") or 0) - 1, 0)
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    every = settings.get("change_prompt_every")
    if isinstance(every, int) and every > 0:      # a '^' story loops: its period is phrases x every
        last %= every * len(entries)
    active = entries[max(k for k in entries if k <= last)] if any(k <= last for k in entries) else []
    texts = [p.get("value") for p in active if isinstance(p, dict) and p.get("kind") == "text"
             and isinstance(p.get("weight"), (int, float)) and p["weight"] > 0 and p.get("value")]
    if texts:
        return ", ".join(texts), ""
    kinds = sorted({str(p.get("kind")) for p in active if isinstance(p, dict)})
    return None, ("the run has no positive-weight text prompt to score against "
                  f"(its prompts: {', '.join(kinds) or 'none'}); pass --prompt TEXT to score it anyway")


def caption_of(prompt: str) -> str:
    """The caption a run is scored against: its positive text prompts without weights, joined by
    ", " (``"a red fox:1.5|snow:0.5|blurry:-1"`` -> ``"a red fox, snow"``); a plain prompt as is."""
    from .prompts import parse_prompts

    try:
        parts = [p.value for p in parse_prompts(prompt) if p.kind == "text" and p.weight > 0]
    except (ValueError, FileNotFoundError):
        return prompt
    return ", ".join(parts) if parts else prompt


def read_pairs(pairs_file: Path, root: Path) -> list[Item]:
    """Pairs from a CSV (header with ``image`` and ``prompt`` columns) or JSONL (``{"image", "prompt"}``
    per line) file; image paths are relative to *root*. Bad rows become error items."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise FileNotFoundError(f"pairs file {str(pairs_file)!r} does not exist; give a CSV or JSONL of image,prompt")
    rows: list[tuple[int, object]] = []
    text = pairs_file.read_text(encoding="utf-8-sig")
    if pairs_file.suffix.lower() == ".json" and text.lstrip().startswith("["):  # a JSON array of objects
        try:
            rows = [(n, row) for n, row in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as err:
            raise ValueError(f"pairs file {str(pairs_file)!r} is not valid JSON ({err.msg} at line {err.lineno})") \
                from None
    elif pairs_file.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                rows.append((n, f"not valid JSON ({err.msg})"))
    else:
        import io

        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = {f.strip().lower(): f for f in reader.fieldnames or []}
        if "image" not in fields or not ({"prompt", "caption"} & fields.keys()):
            raise ValueError(f"pairs file {str(pairs_file)!r} needs a header row with 'image' and 'prompt' columns; "
                             f"found {list(reader.fieldnames or [])}")
        img_col, prompt_col = fields["image"], fields.get("prompt", fields.get("caption"))
        for row in reader:
            n = reader.line_num
            if None in row or any(v is None for v in row.values()):
                rows.append((n, f"has {len(reader.fieldnames)} columns in the header but a different number here "
                                "(quote prompts that contain commas)"))
            else:
                rows.append((n, {"image": row[img_col], "prompt": row[prompt_col],
                                 **{k: v for k, v in row.items() if k not in (img_col, prompt_col)}}))
    items: list[Item] = []
    seen: set[tuple[str, str]] = set()
    for n, row in rows:
        where = f"{pairs_file.name} line {n}"
        if isinstance(row, str):
            items.append(Item(where, None, None, f"{where} {row}"))
            continue
        if not isinstance(row, dict):
            items.append(Item(where, None, None, f"{where} is not an object with 'image' and 'prompt'"))
            continue
        img = row.get("image")
        prompt = row.get("prompt", row.get("caption"))
        if not isinstance(img, str) or not img.strip():
            items.append(Item(where, None, None, f"{where} has no image"))
            continue
        img = img.strip()
        path = Path(img) if Path(img).is_absolute() else root / img
        if not isinstance(prompt, str) or not prompt.strip():
            items.append(Item(img, path, None, f"{where} has no prompt for {img!r}"))
            continue
        item = Item(img, path, prompt, columns={k: v for k, v in row.items() if k not in ("image", "prompt", "caption")})
        if item.key not in seen:
            seen.add(item.key)
            items.append(item)
    return items


GENEVAL_METADATA = "metadata.jsonl"


def read_geneval(folders: Iterable[Path], root: Path) -> list[Item]:
    """Pairs from GenEval's layout: in each prompt folder, ``metadata.jsonl`` (one JSON object with ``prompt``
    and the benchmark's other keys, e.g. ``tag``) and the images ``samples/*.png`` scored against that prompt."""
    items: list[Item] = []
    for folder in folders:
        name = _rel(folder / GENEVAL_METADATA, root)
        try:
            lines = [ln for ln in (folder / GENEVAL_METADATA).read_text(encoding="utf-8").splitlines() if ln.strip()]
            record = json.loads(lines[0]) if lines else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            items.append(Item(name, None, None, f"{name} is not valid JSON ({err.__class__.__name__}); fix or remove it"))
            continue
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            items.append(Item(name, None, None, f"{name} has no \"prompt\"; GenEval's metadata.jsonl holds one "
                                                "object with the prompt"))
            continue
        columns = {k: v for k, v in record.items() if k != "prompt"}
        samples = list_images(folder / "samples") if (folder / "samples").is_dir() else []
        if not samples:
            items.append(Item(name, None, prompt, f"{_rel(folder, root)} has no samples/*.png to score"))
        items += [Item(_rel(p, root), p, prompt, columns=columns) for p in samples]
    return items


def collect_items(path, *, prompt: str | None = None, pairs=None) -> tuple[list[Item], Path]:
    """Every pair to score under *path* (an image, a run folder, a folder of run folders, or a
    folder of images with *pairs* or one *prompt*) and the root that table names are relative to.
    Raises a one-line error when nothing can be scored at all."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; give an image, a run folder or a folder of images")
    if path.is_file():
        root = path.parent
        if pairs is not None:
            raise ValueError("--pairs goes with a folder of images, not a single image; use --prompt TEXT")
        if prompt is None:
            runs = [it for it in read_run(root, root) if it.path is not None and it.path.name == path.name] \
                if (root / SIDECAR).is_file() else []
            if not runs:
                raise ValueError(f"no prompt for {str(path)!r}; pass --prompt TEXT")
            return runs, root
        return [Item(path.name, path, prompt)], root
    root = path
    if pairs is not None:
        items = read_pairs(Path(pairs), root)
        listed = {it.path.resolve() for it in items if it.path is not None}
        for img in list_images(root):
            if img.resolve() not in listed:
                rel = _rel(img, root)
                items.append(Item(rel, img, None, f"{rel} has no row in {Path(pairs).name}"))
    elif prompt is not None:
        items = [Item(_rel(p, root), p, prompt) for p in list_images(root)]
    else:
        sidecars = sorted(p for p in root.rglob(SIDECAR) if not any(
            part.startswith(".") for part in p.relative_to(root).parts[:-1]))
        geneval = [root] if (root / GENEVAL_METADATA).is_file() else \
            sorted(p.parent for p in root.glob(f"*/{GENEVAL_METADATA}"))
        if sidecars:
            items = [it for sc in sidecars for it in read_run(sc.parent, root)]
        elif geneval:
            items = read_geneval(geneval, root)
        else:
            raise ValueError(f"no {SIDECAR} (run folders) or */{GENEVAL_METADATA} (GenEval layout) under "
                             f"{str(root)!r}: pass --pairs FILE (CSV/JSONL of image,prompt) or --prompt TEXT to score "
                             "these images")
    if not items:
        raise ValueError(f"{str(root)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); nothing to score")
    return items, root


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def _load(item: Item):
    try:
        return read_image(item.path)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - a bad file must not stop the others
        return f"image {item.image!r} could not be read ({err.__class__.__name__}); re-save it or leave it out"


def _row(item: Item, model: str, definition: str, prefix: str, score=None, error=None) -> dict:
    status = "ok" if error is None else ("not scorable" if error.startswith("not scorable") else "error")
    row = {"image": item.image, "prompt": item.prompt or "", "model": model, "definition": definition,
           "prefix": prefix, "score": score, "status": status,
           "error": error or "", "seed": item.extra.get("seed", ""), "backend": item.extra.get("backend", "")}
    return _with_columns(row, item)


def _with_columns(row: dict, item: Item) -> dict:
    """*row* with the item's extra columns after its own (a column named like one of the row's own is left out)."""
    return {**row, **{k: v for k, v in item.columns.items() if k not in row}}


def extra_columns(rows: Sequence[dict], base: Sequence[str]) -> list[str]:
    """The columns of *rows* beyond *base*, in first-seen order (the pairs file's or GenEval's own)."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in base and k != "held_out"))


def _cell(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else json.dumps(value, ensure_ascii=False))


def group_value(row: dict, column: str) -> str:
    """The group a row falls in for *column* (lists and objects as JSON; ``(none)`` where it has no value)."""
    value = _cell(row.get(column))
    return value if value.strip() else "(none)"


def check_group_by(rows: Sequence[dict], column: str | None) -> None:
    """A one-line error unless some row has *column*."""
    if column is not None and not any(column in r for r in rows):
        found = sorted({k for r in rows for k in r if k != "held_out"})
        raise ValueError(f"--group-by {column}: no such column; the rows have {', '.join(found)}")


def score_batches(model: ScoreModel, batches: Sequence[Sequence[Item]], *, definition: str = "torchmetrics",
                  prefix: str = "", quantize: bool = True, workers: int = 4, progress=None) -> list[dict]:
    """Score each batch of items with *model*; one row per item (an error row for unreadable files).
    Images are decoded by a small thread pool one batch ahead of the model."""
    rows: list[dict] = []
    if not batches:
        return rows
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(_load, it) for it in batches[0]]
        for i, batch in enumerate(batches):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(_load, it) for it in batches[i + 1]] if i + 1 < len(batches) else []
            ok = [(it, im) for it, im in zip(batch, loaded) if isinstance(im, torch.Tensor)]
            scores: list[float] = []
            if ok:
                cos = model.cosine([im for _, im in ok], [prefix + it.prompt for it, _ in ok], quantize=quantize)
                scores = pair_scores(cos, definition).tolist()
            next_score = iter(scores)
            for it, im in zip(batch, loaded):
                if isinstance(im, torch.Tensor):
                    rows.append(_row(it, model.name, definition, prefix, score=next(next_score)))
                else:
                    rows.append(_row(it, model.name, definition, prefix, error=im))
            if progress is not None:
                progress.update(len(batch))
    return rows


def merge_rows(new: Sequence[dict], old: Iterable[dict]) -> list[dict]:
    """This run's rows followed by the rows of an earlier table that this run did not redo
    (other models, definitions or images), so resuming never loses a row."""
    keys = {_row_key(r) for r in new}
    return list(new) + [r for r in old if _row_key(r) not in keys]


def _row_key(r: dict) -> tuple:
    return (r["image"], r["prompt"], r["model"], r["definition"], r.get("prefix", ""))


_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def process_state(device=None):
    """accelerate's ``PartialState`` when launched on several processes (``accelerate launch``,
    ``torchrun``, ``mpirun``), else ``None``: one process needs no distributed setup or global state.
    CPU processes (``device="cpu"``, or auto without CUDA) get accelerate's gloo setup."""
    import os

    if max(int(os.environ.get(v, "1") or 1) for v in _WORLD_SIZE_VARS) <= 1:
        return None
    from accelerate import PartialState

    cpu = str(device).startswith("cpu") or (device in (None, "auto") and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def evaluate(items: Sequence[Item], models: Sequence[str | ScoreModel], *, definition: str = "torchmetrics",
             prefix: str = "", batch_size: int = 32, device=None, precision=None, image_backend: str = "torchvision",
             quantize: bool = True, done: Iterable[dict] = (), show_progress: bool = True) -> list[dict]:
    """Score every item with every model, skipping (and keeping) rows in *done* for the same image,
    prompt, model, definition and prefix. Runs on all accelerate processes; every process gets the
    full table back, in item order (errors included)."""
    from .score import get_score_model

    if definition not in DEFINITIONS:
        raise ValueError(f"unknown CLIP-score definition {definition!r}; use one of {', '.join(DEFINITIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")
    state = process_state(device)
    if state is not None:  # under `accelerate launch` / torchrun, accelerate places each process
        device = state.device
    elif device == "auto":
        device = None
    kept = {_row_key(r): r for r in done if r.get("status") == "ok"}
    order = {it.key: i for i, it in enumerate(items)}
    out: list[dict] = []
    for spec in models:
        name = spec.name if isinstance(spec, ScoreModel) else str(spec)
        todo, bad = [], []
        for it in items:
            k = (it.image, it.prompt or "", name, definition, prefix)
            if k in kept:
                out.append(kept[k])
            elif it.error is not None:
                bad.append(_row(it, name, definition, prefix, error=it.error))
            else:
                todo.append(it)
        out.extend(bad)
        if not todo:
            continue
        if isinstance(spec, ScoreModel):
            sm = spec
        else:
            sm = ScoreModel.load(spec, device=device, precision=precision, image_backend=image_backend) \
                if image_backend != "torchvision" else get_score_model(spec, device=device, precision=precision)
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        if state is None:
            rows = _score_with_bar(sm, batches, name, definition, prefix, quantize, show_progress)
        else:
            from accelerate.utils import gather_object

            with state.split_between_processes(batches) as mine:
                rows = _score_with_bar(sm, mine, name, definition, prefix, quantize,
                                       show_progress and state.is_main_process)
            rows = gather_object(rows)
        out.extend(rows)
    model_order = {(m.name if isinstance(m, ScoreModel) else str(m)): j for j, m in enumerate(models)}
    out.sort(key=lambda r: (model_order.get(r["model"], len(model_order)),
                            order.get((r["image"], r["prompt"]), len(order))))
    return out


def _score_with_bar(sm, batches, name, definition, prefix, quantize, show) -> list[dict]:
    from tqdm.auto import tqdm

    with tqdm(total=sum(len(b) for b in batches), desc=f"CLIP score {name}", unit="img", disable=not show) as bar:
        return score_batches(sm, batches, definition=definition, prefix=prefix, quantize=quantize, progress=bar)


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
        _atomic_write(Path(json_path), json.dumps(doc, indent=1, ensure_ascii=False, default=str))
    if csv_path is not None:
        import io

        buf = io.StringIO()
        extra = extra_columns(rows, COLUMNS)
        writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, *extra], extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{k: _cell(r.get(k)) for k in extra},
                             "score": "" if r["score"] is None else repr(float(r["score"]))})
        _atomic_write(Path(csv_path), buf.getvalue())


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Several metrics: CLIP score and reward models, one column each (scripts/evaluate.py --metric)
# ---------------------------------------------------------------------------------------------

METRICS_FORMAT = "clipsteer-metrics/1"
METRIC_BASE_COLUMNS = ("image", "prompt", "seed", "backend", "status", "error", "steered_by")


TOY_JUDGE = "toy_judge"  # toy world v3's judging rule as a metric: 1 right, 0 wrong (shared/TOYWORLD.md)


def metric_name(spec: str) -> tuple[str, str | None]:
    """``clip_score[:MODEL]`` or a reward ``NAME[:MODEL]`` -> (``"clip_score"`` or the reward's
    registered name, model or None); one-line error for anything else (a weight is refused)."""
    from .rewards import parse_reward_spec

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
    from .score import DEFAULT_MODEL

    name, model = metric_name(spec)
    steered = item.extra.get("steered_by") or []
    if name in ("clip_score", "clip"):
        target = model or (DEFAULT_MODEL if name == "clip_score" else "openai/clip-vit-large-patch14")
        return any(s.startswith("clip:") and _same_model(s[5:], target) for s in steered)
    return name in steered


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def _metric_scorer(spec: str, *, device, precision):
    """A function ``(images [3,H,W] uint8 list, captions) -> scores [N] float64`` for one metric spec."""
    from .score import DEFAULT_MODEL, get_score_model

    name, model = metric_name(spec)
    if name == TOY_JUDGE:
        return _toy_judge_scores
    if name == "clip_score":
        sm = get_score_model(model or DEFAULT_MODEL, device=device, precision=precision)
        return lambda images, captions: pair_scores(sm.cosine(images, captions), "torchmetrics")
    from .rewards import cached_reward

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
    rows = [_with_columns({"image": it.image, "prompt": it.prompt or "", "seed": it.extra.get("seed", ""),
                           "backend": it.extra.get("backend", ""), "status": "ok" if it.error is None else "error",
                           "error": it.error or "", "steered_by": " ".join(it.extra.get("steered_by") or []),
                           **{m: None for m in metrics}}, it) for it in items]
    todo = [i for i, it in enumerate(items) if it.error is None]
    images: dict[int, torch.Tensor] = {}
    for i in todo:
        loaded = _load(items[i])
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


def grouped(rows: Sequence[dict], column: str, key=None) -> list[tuple[str, list[dict]]]:
    """*rows* split by their value of *column* (or by ``key(row)``), in first-seen order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(key(r) if key is not None else group_value(r, column), []).append(r)
    return list(out.items())


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
        _atomic_write(Path(json_path), json.dumps(doc, indent=1, ensure_ascii=False, default=str))
    if csv_path is not None:
        import io

        buf = io.StringIO()
        columns = [*METRIC_BASE_COLUMNS, *metrics]
        columns += extra_columns(rows, columns)
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{k: _cell(r.get(k)) for k in columns[len(METRIC_BASE_COLUMNS) + len(metrics):]},
                             **{m: "" if r.get(m) is None else repr(float(r[m])) for m in metrics}})
        _atomic_write(Path(csv_path), buf.getvalue())
