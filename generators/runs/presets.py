"""Named presets: plain dicts of option defaults that a config file and the command line override.

``toy`` runs fully offline on the small models trained on the toy world (``toyworld/weights``):
toy CLIPs ``clip_a``, ``clip_c`` and ``clip_d`` guide together, the independent ``clip_b`` judges
the result, and each backend adds its own toy models and settings (its class's ``presets``), at
the toy world's 64x64 size. Several guiding CLIPs, as pixray and Disco Diffusion ensemble them:
an image optimised against one small CLIP finds colour patterns that it, alone, reads as a shape;
patterns that fool differently built CLIPs at once are much rarer (benchmarks/quality.py
measures it).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable


def toyworld_weights(name: str, *, check: bool = False) -> Path:
    """Folder of a toy model (``clip_a`` ... ``clip_d``, ``vqgan``, ``sd``) from ``toyworld.paths``
    (else ``<toyworld package>/weights/<name>``). With ``check``, a missing or incomplete folder
    raises ``FileNotFoundError`` naming the command that recreates it."""
    try:
        paths = importlib.import_module("toyworld.paths")
    except ImportError:
        paths = None
    if paths is not None and callable(getattr(paths, "weights_dir", None)):
        return Path(paths.weights_dir(name, check=check))
    spec = importlib.util.find_spec("toyworld")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the toyworld package is not installed; the toy preset needs its weights "
                                "(pip install -e . from the clipsteer checkout)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "weights" / name
    if check and not folder.is_dir():
        raise FileNotFoundError(f"toy model {name!r} is missing at {folder}; train the toy models first")
    return folder


def _toy() -> dict[str, Any]:
    """The shared part of ``--preset toy``: the toy CLIP ensemble and judge, the world's size and the
    cutout settings chosen on the toy world's tuning prompts. Each backend adds its own part
    (``presets = {"toy": ...}`` on its class: model paths, tuned steps)."""
    needed = ("clip_a", "clip_c", "clip_d")
    folder = {name: toyworld_weights(name, check=name in needed) for name in ("clip_a", "clip_b", "clip_c", "clip_d")}
    return {
        "clip": [str(folder[name]) for name in needed],
        "eval_model": str(folder["clip_b"]),
        "width": 64,
        "height": 64,
        # chosen on small grids judged by toyworld.judge on the tuning prompts (benchmarks/quality.py
        # --prompt-seed 7); image size == CLIP input size, hence large cutouts.
        "cutouts": 8,
        "cut_pow": 1.0,
        "min_fraction": 0.6,
        "overview": 2,
        "augmentations": ["Af:0.5", "Pe:0.3", "Ji:0.5"],
        "threads": 1,  # tiny models: one thread is as fast, and much faster on a busy machine
        # tiny models: bf16's casts and slower elementwise work outweigh its faster matrix products
        # (docs/benchmarks.md, "How the toy settings were chosen"), and the toy figures are fp32's
        "precision": "fp32",
    }


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {"toy": _toy}
DESCRIPTIONS = {"toy": "offline toy models from toyworld/weights (64x64; CLIPs clip_a+clip_c+clip_d guide, clip_b scores)"}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, *, backend: str | None = None) -> dict[str, Any]:
    """The options of preset *name* for *backend*: the shared part, then the backend's own
    (``Generator.presets[name]``), as a fresh dict with paths resolved now."""
    from .. import DEFAULT_BACKEND, get_generator_class

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    options = dict(PRESETS[name]())
    own = getattr(get_generator_class(backend or DEFAULT_BACKEND), "presets", {}) or {}
    if name in own:
        options.update(own[name]())
    return options


__all__ = ["PRESETS", "DESCRIPTIONS", "preset_names", "get_preset", "toyworld_weights"]
