"""A run's input files (``--init-image``, ``--image-prompt``) copied into its run folder, so that the folder
holds all it was made from: ``generate(..., keep_inputs=True)`` (the web UI's uploads always are).

The copies go to ``<run folder>/inputs/`` under their own names (``-2``, ``-3``... when two share a name);
the run's options then name the copies, so run.json records ``inputs/<name>`` and ``--from run.json`` finds
them. Nothing outside the run folder is written, and nothing is overwritten.
"""

from __future__ import annotations

import shutil
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

INPUTS = "inputs"


def _free_name(folder: Path, name: str) -> Path:
    stem, suffix = Path(name).stem or "input", Path(name).suffix
    for n in range(1, 10_000):
        path = folder / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        if not path.exists():
            return path
    raise RuntimeError(f"no free name for {name!r} in {str(folder)!r}")


def keep_inputs(opts: dict[str, Any], settings: Any, folder: Path, backend: str) -> list[str]:
    """Copy every input file of *opts* into ``folder/inputs`` and point *opts* (and the backend's *settings*)
    at the copies; returns the copies' paths relative to *folder*."""
    from .paths import FILE, map_local_paths, path_options

    kinds = {name: kind for name, kind in path_options(backend).items() if kind == FILE and opts.get(name)}
    if not kinds:
        return []
    target = folder / INPUTS
    copies: dict[str, str] = {}

    def copy(path: str) -> str:
        if path not in copies:
            target.mkdir(exist_ok=True)
            dest = _free_name(target, Path(path).name)
            with open(Path(path).expanduser(), "rb") as src, open(dest, "xb") as out:
                shutil.copyfileobj(src, out)
            copies[path] = str(dest)
        return copies[path]

    changed = map_local_paths(opts, kinds, copy)
    for name in kinds:
        opts[name] = changed[name]
        field = getattr(settings, name, None) if is_dataclass(settings) else None
        if field is not None:
            setattr(settings, name, changed[name])
    return [Path(p).relative_to(folder).as_posix() for p in copies.values()]


__all__ = ["INPUTS", "keep_inputs"]
