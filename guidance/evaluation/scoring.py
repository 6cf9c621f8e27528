"""Scoring the pairs with CLIP models, in batches, split over processes with accelerate
(``split_between_processes`` + ``gather_object``); one row per pair and model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import torch

from ..images import read_image
from ..score import DEFINITIONS, ScoreModel, pair_scores
from .pairs import Item
from .report import with_columns


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def load_item(item: Item):
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
    return with_columns(row, item)


def score_batches(model: ScoreModel, batches: Sequence[Sequence[Item]], *, definition: str = "torchmetrics",
                  prefix: str = "", quantize: bool = True, workers: int = 4, progress=None) -> list[dict]:
    """Score each batch of items with *model*; one row per item (an error row for unreadable files).
    Images are decoded by a small thread pool one batch ahead of the model."""
    rows: list[dict] = []
    if not batches:
        return rows
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(load_item, it) for it in batches[0]]
        for i, batch in enumerate(batches):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(load_item, it) for it in batches[i + 1]] if i + 1 < len(batches) else []
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
    from ..score import get_score_model

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
