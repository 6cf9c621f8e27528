"""run.json as a type (:class:`RunRecord`); how a run's options are written down (run.json and each PNG) and
read back (``--resume``, the web UI's Reuse); and the digest that ties a checkpoint to its run.

Paths are recorded relative to the run folder (``../../models/clip``), so a shared PNG shows none of the
user's folders and a moved clone still resumes; a model from a preset is recorded as the preset's
(``preset toy: clip_a``) and taken from the preset again when read back; Hub ids and known names stay
as they are. ``--record-paths absolute`` records every local path absolute instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import RESUME_OPTIONS
from .outputs import SIDECAR
from .paths import map_local_paths, path_options

RECORD_MODES = ("relative", "absolute")
#: options that are not part of a run's identity: those --resume may change
NOT_IDENTITY = RESUME_OPTIONS


def _from_preset(source: str | None) -> str | None:
    """The preset's name when an option's source is one (``"preset toy"``), else ``None``."""
    return source.split(" ", 1)[1] if source and source.startswith("preset ") else None


def record_path(path: str, folder: Path | None, mode: str) -> str:
    """One local *path* as recorded: relative to *folder* (``relative``) or absolute."""
    absolute = os.path.abspath(os.path.expanduser(path))
    if mode == "absolute" or folder is None:
        return absolute
    return os.path.relpath(absolute, os.path.abspath(folder))


def recorded_options(opts: Mapping[str, Any], sources: Mapping[str, str], folder: Path | None,
                     mode: str = "relative") -> dict[str, Any]:
    """*opts* as run.json's ``settings`` records them (sorted; paths as the module docstring says)."""
    kinds = path_options()
    out = {k: opts[k] for k in sorted(opts)}
    if folder is None:                     # an unsaved run: nothing is shared, the values stay as given
        return out
    if out.get("out"):
        out["out"] = record_path(str(out["out"]), folder, mode)
    for name in kinds:
        if name not in out:
            continue
        preset = _from_preset(sources.get(name)) if mode == "relative" else None
        change = (lambda p, preset=preset: f"preset {preset}: {Path(p).name}") if preset else \
            (lambda p: record_path(p, folder, mode))
        out[name] = map_local_paths({name: out[name]}, {name: kinds[name]}, change)[name]
    return out


def recorded_value(value: Any, folder: Path | None, mode: str = "relative", *, keep: tuple[str, ...] = ()) -> Any:
    """Any other metadata with the local paths in it recorded (strings that are existing absolute paths);
    the top-level keys in *keep* (the settings, recorded by :func:`recorded_options`) as they are."""
    if folder is None:
        return value
    if isinstance(value, dict):
        return {k: v if k in keep else recorded_value(v, folder, mode) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [recorded_value(v, folder, mode) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and os.path.exists(value):
        return record_path(value, folder, mode)
    return value


def read_back(settings: Mapping[str, Any], sources: Mapping[str, str], folder: Path | None) -> dict[str, Any]:
    """Recorded *settings* of the run in *folder* as options again: relative paths resolved against the
    folder (left as they are without one), and the options that came from a preset left out (the preset
    gives them again)."""
    kinds = path_options()
    out = {k: v for k, v in settings.items() if not (k in kinds and _from_preset(sources.get(k)))}
    if folder is None:        # relative paths cannot be resolved: the run folder's own "out" is left out
        if isinstance(out.get("out"), str) and not os.path.isabs(out["out"]):
            out.pop("out")
        return out
    base = Path(folder).expanduser().absolute()

    def absolute(path: str) -> str:
        return path if os.path.isabs(os.path.expanduser(path)) else os.path.normpath(base / path)

    if isinstance(out.get("out"), str):
        out["out"] = absolute(out["out"])
    return map_local_paths(out, {k: v for k, v in kinds.items() if k in out}, absolute)


def run_identity(backend: str, settings: Mapping[str, Any]) -> str:
    """A digest of what makes a run this run (its backend and recorded settings, less :data:`NOT_IDENTITY`),
    stored with its checkpoint so that ``--resume`` continues only the run the checkpoint belongs to."""
    from .outputs import to_jsonable

    kept = {k: v for k, v in settings.items() if k not in NOT_IDENTITY}
    text = json.dumps(to_jsonable({"backend": backend, "settings": kept}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()




#: the keys run.json has only when they are set
OPTIONAL_KEYS = ("resumed_from", "replayed_from", "inputs", "checkpoint", "rewards", "steered_by", "reward_scores", "animations", "timings")


@dataclass
class RunRecord:
    """A run's ``run.json`` (and the JSON in each of its PNGs): what it made and what made it.

    :meth:`to_dict` is the file's content, :meth:`write` writes it, :meth:`read` / :meth:`from_dict` take it
    back (keys this version does not know are kept in ``extra`` and written again)."""

    prompt: str
    seed: int
    seeds: list[int]                          # each image's seed (seed + i, or --seeds)
    backend: str
    clip_score: float | None
    image: str
    images: list[str]
    interrupted: bool
    stopped_at: int | None
    eval_model: str | None
    clip_scores: dict[str, Any]
    prompts: dict[str, Any]
    settings: dict[str, Any]                  # the run's options as recorded (:func:`recorded_options`)
    backend_settings: dict[str, Any]
    option_sources: dict[str, str]            # where each option not left at its default came from
    preset: str | None
    config: str | None
    model: dict[str, Any] | None              # the model and its hash, as A1111's parameters give them
    device: str
    precision: str
    precision_choice: dict[str, Any] | None
    steps_done: int
    info: dict[str, Any]                      # the backend's own account of the run
    versions: dict[str, str]
    created: str
    losses: list[float | None]
    resumed_from: Any = None
    replayed_from: str | None = None          # --from: the PNG or run.json made again
    inputs: Any = None                        # keep_inputs: the copies of the input files in the run folder
    checkpoint: str | None = None
    rewards: list[dict[str, Any]] | None = None
    steered_by: list[str] | None = None       # the models that steered (evaluate.py --held-out leaves them out)
    reward_scores: Any = None
    animations: list[str] | None = None
    timings: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if not (k in OPTIONAL_KEYS and v is None)}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunRecord":
        """A record from run.json's content; ``ValueError`` for JSON that is not a clipsteer run record."""
        if not isinstance(data, Mapping) or not isinstance(data.get("settings"), dict) or "backend" not in data:
            raise ValueError(f"not a clipsteer run record (no backend and settings in its {SIDECAR})")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        missing = {f.name: None for f in fields(cls) if f.name not in known and f.name != "extra"
                   and f.default is MISSING}
        return cls(**missing, **known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, path: str | Path) -> "RunRecord":
        """The record of a run folder (or of its ``run.json``): ``FileNotFoundError`` without one, ``ValueError``
        for a file that is not readable JSON or not a run record."""
        path = Path(path)
        if path.is_dir():
            path = path / SIDECAR
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"its {SIDECAR} is not readable JSON") from None
        return cls.from_dict(data)

    def resolved_settings(self, folder: Path) -> dict[str, Any]:
        """The recorded settings with every path usable again: :func:`read_back`, and the options it left out
        to the preset taken from the preset (for readers that need the models, e.g. evaluate.py --held-out)."""
        settings = self.settings if isinstance(self.settings, Mapping) else {}
        sources = self.option_sources if isinstance(self.option_sources, Mapping) else {}
        back = read_back(settings, sources, folder)
        missing = set(settings) - set(back)
        if missing and self.preset:
            from .presets import get_preset

            try:
                preset = get_preset(str(self.preset), backend=self.backend)
            except (OSError, ValueError):      # the preset (or its models) is gone: its models stay unknown
                preset = {}
            back.update({k: preset[k] for k in missing if k in preset})
        return back

    def write(self, folder: str | Path) -> Path:
        """``folder/run.json`` (written last in a run: its presence marks a finished run folder)."""
        from .outputs import write_json

        return write_json(Path(folder) / SIDECAR, self.to_dict())


__all__ = ["NOT_IDENTITY", "RECORD_MODES", "RunRecord", "read_back", "record_path", "recorded_options",
           "recorded_value", "run_identity"]
