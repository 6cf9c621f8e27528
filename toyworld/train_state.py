"""Resumable training: a trainer's whole state (models, optimiser, schedule, EMA, every random
generator) saved every few steps and restored exactly, so a stopped run resumed with ``--resume``
ends with the same weights as an uninterrupted one.

The state is written without pickle: tensors go to ``<name>.safetensors`` under their path in the
nested state, everything else (ints, floats, strings, numpy generator states) to ``<name>.json``.
Both are written to temporary files and renamed into place, so a run stopped mid-write keeps the
previous checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TENSOR = "__tensor__"
CHECKPOINT_EVERY = 200  # steps between two checkpoints of a training loop


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()  # clone: state dicts share storage
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{path}/k{i}", tensors), _split(v, f"{path}/{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a training state")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_join(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def rng_state(np_rng: np.random.Generator | None = None, generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random generator a trainer uses: torch's global one, named ``torch.Generator`` s, numpy's."""
    return {
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
        "numpy": np_rng.bit_generator.state if np_rng is not None else None,
    }


def restore_rng(state: dict, np_rng: np.random.Generator | None = None,
                generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in (generators or {}).items():
        g.set_state(state["generators"][k])
    if np_rng is not None and state.get("numpy") is not None:
        np_rng.bit_generator.state = state["numpy"]


def save_state(folder: str | Path, name: str, state: dict) -> None:
    """Write ``state`` (nested dicts/lists of tensors and plain values) as ``folder/name.{json,safetensors}``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    tmp_t, tmp_j = folder / f".{name}.safetensors.tmp", folder / f".{name}.json.tmp"
    save_file(tensors, str(tmp_t))
    tmp_j.write_text(json.dumps(skeleton))
    os.replace(tmp_t, folder / f"{name}.safetensors")
    os.replace(tmp_j, folder / f"{name}.json")


def load_state(folder: str | Path, name: str) -> dict | None:
    """The state saved by :func:`save_state`, or ``None`` where there is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    j, t = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not (j.is_file() and t.is_file()):
        return None
    return _join(json.loads(j.read_text()), load_file(str(t)))


def clear_state(folder: str | Path, name: str) -> None:
    for suffix in (".json", ".safetensors"):
        (Path(folder) / f"{name}{suffix}").unlink(missing_ok=True)


class Checkpointer:
    """Saves a training loop's state every ``every`` steps into ``folder`` and, with ``resume``, restores
    the latest one at the start. ``objects`` maps names to things with ``state_dict``/``load_state_dict``
    (models, optimisers, lr schedules); ``extra`` values (EMA weights, running means, counters) travel
    through :meth:`save` and come back from :meth:`start`.

        ckpt = Checkpointer(folder, "unet", resume=resume, objects={...}, np_rng=rng)
        first, extra = ckpt.start()        # 0 and {} on a fresh run
        for step in range(first, steps):
            ...
            ckpt.step_done(step, extra={...})
        ckpt.finish()
    """

    def __init__(self, folder: str | Path | None, name: str, *, every: int | None = None, resume: bool = False,
                 objects: dict[str, Any] | None = None, np_rng: np.random.Generator | None = None,
                 generators: dict[str, torch.Generator] | None = None, log=print):
        self.folder, self.name, self.resume = (Path(folder) if folder else None), name, resume
        self.every = CHECKPOINT_EVERY if every is None else every
        self.objects, self.np_rng, self.generators, self.log = objects or {}, np_rng, generators or {}, log

    def start(self) -> tuple[int, dict]:
        import time

        self._t0, self._before = time.perf_counter(), 0.0
        if not (self.resume and self.folder):
            return 0, {}
        state = load_state(self.folder, self.name)
        if state is None:
            return 0, {}
        self._before = float(state.get("elapsed", 0.0))
        for k, obj in self.objects.items():
            obj.load_state_dict(state["objects"][k])
        restore_rng(state["rng"], self.np_rng, self.generators)
        self.log(f"[{self.name}] resumed after step {state['step']} from {self.folder}")
        return state["step"] + 1, state.get("extra", {})

    def step_done(self, step: int, extra: dict | None = None) -> None:
        if self.folder and self.every and (step + 1) % self.every == 0:
            save_state(self.folder, self.name, {
                "step": step, "elapsed": self.elapsed(), "objects": {k: obj.state_dict() for k, obj in self.objects.items()},
                "rng": rng_state(self.np_rng, self.generators), "extra": extra or {}})

    def elapsed(self) -> float:
        """Seconds this loop has trained, over every resumed part of it."""
        import time

        return self._before + time.perf_counter() - self._t0

    def finish(self) -> None:
        if self.folder:
            clear_state(self.folder, self.name)
