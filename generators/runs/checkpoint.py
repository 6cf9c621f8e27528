"""Resumable optimisation runs: the shared loop's state on disk, and a run folder read back to continue it.

A checkpoint is two files in the run folder, written together and replaced atomically:
``checkpoint.safetensors`` (every tensor: latents, optimiser state, the objective's random-generator
state, the best iterate) and ``checkpoint.json`` (the rest: step, losses so far, optimiser
hyper-parameters, lr-schedule state, with placeholders naming the tensors). No pickle is written or
read. :func:`generators.optimise.optimise` writes one when a run ends early (Ctrl-C or a callback
stop) and, with ``--checkpoint-every N``, every N steps and at the end; ``--resume RUN_FOLDER``
(:func:`resume_options`) continues the run in a new folder, and the result is the one the
uninterrupted run gives, bit for bit on the CPU.

The loop's only random stream is the objective's ``torch.Generator`` (cutouts and augmentations; kornia
runs inside ``fork_rng`` seeded from it), so its state is the RNG state kept. Diffusion sampling (the
``sd`` backend) has no checkpoint: rerun it with the same ``--seed``, which gives the same image.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "clipsteer-checkpoint/1"
# Options that --resume may change; every other option is the run's own.
RESUME_OPTIONS = ("iterations", "out", "progress", "threads", "device", "checkpoint_every", "record_paths")


def _split(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """*value* as JSON types, each tensor replaced by ``{"tensor": key}`` and put (a CPU copy) in *tensors*."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(value, Mapping):
        if any(not isinstance(k, (str, int)) for k in value):
            raise TypeError(f"cannot checkpoint a mapping with keys {list(value)!r}")
        return {"dict": [[k, _split(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path}")


def _join(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_split`."""
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "tuple" in value:
            return tuple(_join(v, tensors) for v in value["tuple"])
        return {k: _join(v, tensors) for k, v in value["dict"]}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


@dataclass
class LoopState:
    """The shared loop after ``step`` steps (tensors may live on the device until saved)."""

    step: int
    total: int
    latents: list[torch.Tensor]
    optimizer: dict
    lr_schedule: dict | None
    generator: torch.Tensor | None
    losses: list        # floats, or 0-d tensors until saved (no host sync per step)
    best: list[torch.Tensor] | None = None
    best_loss: torch.Tensor | None = None
    best_step: torch.Tensor | None = None

    def tree(self) -> dict[str, Any]:
        tree = {k: getattr(self, k) for k in ("step", "total", "latents", "optimizer", "lr_schedule", "generator",
                                              "best", "best_loss", "best_step")}
        tree["losses"] = [float(x) for x in self.losses]
        return tree


def snapshot(step: int, total: int, latents: list[torch.Tensor], optimizer: torch.optim.Optimizer, lr_schedule,
             generator: torch.Generator | None, losses: list[torch.Tensor], best=None, best_loss=None,
             best_step=None) -> LoopState:
    """A copy of the loop's state (clones on the same device: cheap next to a step)."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    return LoopState(step=step, total=total, latents=[t.detach().clone() for t in latents],
                     optimizer=copy(optimizer.state_dict()),
                     lr_schedule=copy(lr_schedule.state_dict()) if lr_schedule is not None else None,
                     generator=generator.get_state() if generator is not None else None,
                     losses=list(losses),
                     best=[t.clone() for t in best] if best is not None else None,
                     best_loss=None if best_loss is None else best_loss.clone(),
                     best_step=None if best_step is None else best_step.clone())


def save_state(folder: str | Path, state: LoopState, identity: str | None = None) -> Path:
    """Write ``checkpoint.safetensors`` + ``checkpoint.json`` in *folder*, each replaced atomically; a shared
    random token ties the pair, so a crash between the two replacements is detected on loading. *identity*
    (:func:`generators.runs.record.run_identity`) ties the checkpoint to its run."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state.tree(), tensors, "state")
    token = secrets.token_hex(8)
    tmp_t, tmp_j = folder / (CHECKPOINT_TENSORS + ".tmp"), folder / (CHECKPOINT_JSON + ".tmp")
    save_file(tensors, str(tmp_t), metadata={"format": FORMAT, "token": token})
    tmp_j.write_text(json.dumps({"format": FORMAT, "token": token, "run": identity, "step": state.step,
                                 "state": tree}), encoding="utf-8")
    os.replace(tmp_t, folder / CHECKPOINT_TENSORS)
    os.replace(tmp_j, folder / CHECKPOINT_JSON)
    return folder / CHECKPOINT_JSON


def read_header(folder: str | Path) -> dict:
    """``checkpoint.json`` of a run folder, or a one-line error saying what is missing."""
    folder = Path(folder)
    path = folder / CHECKPOINT_JSON
    if not path.is_file() or not (folder / CHECKPOINT_TENSORS).is_file():
        raise FileNotFoundError(f"run folder {str(folder)!r} has no checkpoint ({CHECKPOINT_JSON} + "
                                f"{CHECKPOINT_TENSORS}); a run writes one on Ctrl-C, on a stop, or with "
                                "--checkpoint-every N (vqgan, pixels and noise backends)")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable checkpoint ({err}); it cannot be resumed") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a clipsteer checkpoint ({FORMAT}); it cannot be resumed")
    return header


def load_state(folder: str | Path) -> LoopState:
    """The :class:`LoopState` saved in *folder* (CPU tensors); a one-line error for a missing or broken pair."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    header = read_header(folder)
    path = folder / CHECKPOINT_TENSORS
    try:
        with safe_open(str(path), framework="pt") as fh:
            token = (fh.metadata() or {}).get("token")
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{str(path)!r} is not readable ({err.__class__.__name__}); it cannot be resumed") from None
    if token != header.get("token"):
        raise ValueError(f"{CHECKPOINT_JSON} and {CHECKPOINT_TENSORS} in {str(folder)!r} are from different "
                         "saves (the run stopped while writing them); it cannot be resumed")
    return _loop_state(header.get("state"), tensors, folder / CHECKPOINT_JSON)


def _loop_state(tree: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> LoopState:
    """The :class:`LoopState` of a checkpoint's ``state``, its structure checked first: a one-line error
    naming what is wrong, never a ``KeyError``/``TypeError`` from deep in the optimiser."""
    from dataclasses import fields

    def broken(what: str) -> ValueError:
        return ValueError(f"{str(path)!r} holds a broken state ({what}); it cannot be resumed: start the run again "
                          "(same --seed) or resume another run folder")

    try:
        state = _join(tree, tensors) if isinstance(tree, dict) else None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise broken("its entries do not match the tensors file") from None
    if not isinstance(state, dict):
        raise broken("no state mapping")
    expected = {f.name for f in fields(LoopState)}
    if set(state) != expected:
        raise broken(f"fields {sorted(set(state) ^ expected)} missing or unknown")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def tensors_list(v):
        return isinstance(v, list) and bool(v) and all(isinstance(t, torch.Tensor) for t in v)

    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    checks = [
        (is_int(state["step"]) and is_int(state["total"]) and 0 <= state["step"], "step and total must be counts"),
        (tensors_list(state["latents"]), "latents must be a list of tensors"),
        (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) and isinstance(groups, list)
         and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups),
         "the optimiser state must hold state and param_groups"),
        (state["lr_schedule"] is None or isinstance(state["lr_schedule"], dict), "the lr schedule must be a mapping"),
        (state["generator"] is None or (isinstance(state["generator"], torch.Tensor)
                                        and state["generator"].dtype == torch.uint8), "the RNG state must be bytes"),
        (isinstance(state["losses"], list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in state["losses"]), "losses must be numbers"),
        (state["best"] is None or tensors_list(state["best"]), "best must be a list of tensors"),
        (all(state[k] is None or isinstance(state[k], torch.Tensor) for k in ("best_loss", "best_step")),
         "best_loss and best_step must be tensors"),
    ]
    for ok, what in checks:
        if not ok:
            raise broken(what)
    return LoopState(**state)


class Checkpointer:
    """What the session hands the shared loop: where to write (``folder``; ``None``: nowhere), how often
    (``every`` steps; 0: only when the run ends early) and the state to start from (``resume``)."""

    def __init__(self, folder: str | Path | None, *, every: int = 0, resume: LoopState | None = None,
                 identity: str | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.every = int(every or 0)
        self.resume = resume
        self.identity = identity
        self.saved: Path | None = None

    def due(self, steps_done: int, total: int) -> bool:
        return self.every > 0 and (steps_done % self.every == 0 or steps_done == total)

    def save(self, state: LoopState) -> None:
        if self.folder is not None:
            self.saved = save_state(self.folder, state, self.identity)


def restore(state: LoopState, latents: list[torch.Tensor], optimizer: torch.optim.Optimizer, lr_schedule,
            generator: torch.Generator | None) -> None:
    """Put *state* into the loop's objects (latents copied in place, keeping their device and dtype)."""
    if len(state.latents) != len(latents) or any(a.shape != b.shape for a, b in zip(state.latents, latents)):
        raise ValueError(f"the checkpoint's latents {[list(t.shape) for t in state.latents]} do not fit this run's "
                         f"{[list(t.shape) for t in latents]}; resume with the run's own options")
    with torch.no_grad():
        for t, saved in zip(latents, state.latents):
            t.copy_(saved)
    optimizer.load_state_dict(state.optimizer)
    if (lr_schedule is None) != (state.lr_schedule is None):
        raise ValueError("the checkpoint's lr schedule does not match this run's; resume with the run's own options")
    if lr_schedule is not None:
        lr_schedule.load_state_dict(state.lr_schedule)
    if generator is not None and state.generator is not None:
        generator.set_state(state.generator)


# ---------------------------------------------------------------------------------------------
# Reading a run folder back: --resume
# ---------------------------------------------------------------------------------------------

def resume_options(folder: str | Path, given: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict]:
    """(backend, options, provenance) that continue the run in *folder*: its own recorded options, with only
    :data:`RESUME_OPTIONS` changeable (*given*); one-line errors, before any model loads, for a folder that
    is not a run, a backend that cannot resume, a missing checkpoint or options that would change the run."""
    from .. import get_generator_class
    from .options import resolve_options
    from .outputs import SIDECAR
    from .record import RunRecord, read_back

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {str(folder)!r}: no such run folder; give a folder that generate.py wrote")
    try:
        record = RunRecord.read(folder)
    except FileNotFoundError:
        raise ValueError(f"--resume {str(folder)!r} is not a run folder (it has no {SIDECAR}); give a folder "
                         "that generate.py wrote") from None
    except ValueError as err:
        readable = "JSON" in str(err)
        raise ValueError(f"--resume {str(folder)!r}: its {SIDECAR} is "
                         + ("not readable JSON; it cannot be resumed" if readable else "not a clipsteer run record")) \
            from None
    backend = record.backend
    if not getattr(get_generator_class(backend), "resumable", False):
        raise ValueError(f"--resume: the {backend} backend cannot resume a run (diffusion sampling keeps no "
                         "checkpoint); run it again with the same --seed, which gives the same image")
    done = load_state(folder).step            # the whole checkpoint is read once now, before any model loads
    _check_identity(folder, backend, record.settings)
    extra = sorted(k for k, v in given.items() if v is not None and k not in RESUME_OPTIONS)
    if extra:
        raise ValueError(f"--resume continues a run with its own options; {', '.join(extra)} cannot be changed "
                         f"(allowed: {', '.join(RESUME_OPTIONS)})")
    sources = record.option_sources if isinstance(record.option_sources, dict) else {}
    back = read_back(record.settings, sources, folder)
    preset = record.preset if set(back) != set(record.settings) else None   # it gives its models again
    recorded = {k: v for k, v in back.items() if v is not None}
    prompt = recorded.pop("prompt", None)
    changes = {k: v for k, v in given.items() if v is not None}
    changes.setdefault("out", str(folder.parent))        # by default the new run goes beside the old one
    backend, opts, provenance = resolve_options(prompt, backend=backend, preset=preset, config=recorded, **changes)
    iterations = opts.get("iterations")
    if isinstance(iterations, int) and iterations < done:
        raise ValueError(f"--resume: the run already did {done} steps; give --iterations {done} or more")
    before = recorded.get("iterations")
    if iterations != before and str(opts.get("lr_schedule", "constant")).lower() != "constant":
        raise ValueError(f"--iterations {iterations} would change the {opts['lr_schedule']} lr schedule of a run "
                         f"made for {before} steps; only a constant schedule can be extended")
    provenance["resumed_from"] = {"folder": str(folder), "step": done}
    return backend, opts, provenance


def _check_identity(folder: Path, backend: str, settings: Mapping[str, Any]) -> None:
    """The checkpoint in *folder* must be the one its run wrote: the digest stored with it is the digest of
    the run.json beside it (a checkpoint copied from another run, or a run.json edited, is refused)."""
    import warnings

    from .record import run_identity

    stored = read_header(folder).get("run")
    if stored is None:
        warnings.warn(f"the checkpoint in {str(folder)!r} predates run digests, so whether it belongs to this "
                      "run cannot be checked; resuming it as it is", stacklevel=3)
        return
    if stored != run_identity(backend, settings):
        raise ValueError(f"--resume {str(folder)!r}: its checkpoint belongs to another run (it was written for other "
                         "options or another prompt than this folder's run.json); resume the run folder that wrote "
                         "it, or start this run again")


__all__ = ["CHECKPOINT_TENSORS", "CHECKPOINT_JSON", "RESUME_OPTIONS", "LoopState", "Checkpointer", "snapshot",
           "save_state", "load_state", "read_header", "restore", "resume_options"]
