"""Which image-caption pairs to score: run folders (their ``run.json``), GenEval's folder layout, a pairs
file (CSV/JSONL of ``image,prompt`` rows) or one caption for every image; bad inputs become error items."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: the record of a run folder written by scripts/generate.py (generators.runs.record.RunRecord)
SIDECAR = "run.json"


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
    from ..encoders import parse_encoder_spec

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
    from ..prompts import parse_prompts

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
