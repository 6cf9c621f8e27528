"""``generate.py --prompts-file ... --export LAYOUT``: a batch's finished images copied into a benchmark's folder
layout: ``geneval`` (``<row>/metadata.jsonl`` + ``samples/NNNN.png``) or ``flat`` (images + ``captions.csv``
for ``evaluate.py --pairs``)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .batch import Row

LAYOUTS = ("geneval", "flat")


def export_runs(entries: list[dict], rows: list[Row], out: Path, destination: Path, layout: str) -> Path:
    """Copy the finished runs' images into *layout* (``geneval`` or ``flat``) under *destination*. Exporting
    again adds what is new: an image already there is left alone when identical, and refused (before
    anything is copied) when different; the listing files (``metadata.jsonl``, ``captions.csv``) are
    rewritten from the index."""
    from guidance.evaluation.pairs import caption_of

    by_row: dict[int, list[dict]] = {}
    for entry in entries:
        if entry.get("status") == "ok":
            by_row.setdefault(int(entry["row"]), []).append(entry)
    copies: list[tuple[Path, Path]] = []
    listings: dict[Path, str] = {}
    captions = io.StringIO(newline="")
    writer = csv.DictWriter(captions, fieldnames=["image", "prompt"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        images = [out / p for e in sorted(by_row.get(row.index, []), key=lambda e: e.get("order", 0))
                  for p in e["images"]]
        if images and layout == "geneval":
            folder = destination / f"{row.index:05d}"
            listings[folder / "metadata.jsonl"] = json.dumps(row.record, ensure_ascii=False) + "\n"
            copies += [(image, folder / "samples" / f"{n:04d}.png") for n, image in enumerate(images)]
        elif images:
            for n, image in enumerate(images):
                name = f"{row.index:05d}-{n:04d}.png"
                copies.append((image, destination / name))
                writer.writerow({"image": name, "prompt": caption_of(row.prompt)})
    if layout == "flat":
        listings[destination / "captions.csv"] = captions.getvalue()
    for source, target in copies:
        if target.exists() and target.read_bytes() != source.read_bytes():
            raise FileExistsError(f"export: {str(target)!r} exists with a different image; nothing overwritten; "
                                  "give a new folder with --export-dir")
    for source, target in copies:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    for path, text in listings.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return destination
