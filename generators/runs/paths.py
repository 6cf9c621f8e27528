"""The model and file references inside option values, and their local paths.

An option declared with ``path="model"`` (``--clip``, ``--vqgan``, ``--sd``, ``--eval-model``...) names a
model: a Hub id, a known name or a local folder/file; one declared with ``path="file"`` (``--init-image``,
``--image-prompt``) names a local file. A value may wrap the reference (``MODEL=WEIGHT``,
``PATH:WEIGHT``, ``NAME:MODEL=WEIGHT``, ``open_clip:ARCH/FILE``); :func:`reference` finds it and
:func:`local_path` its local path, if it has one. The web UI's server checks these against its
allow-lists (:mod:`webui.policy`); a run records them relative to its run folder
(:mod:`generators.runs.record`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

MODEL, FILE = "model", "file"


def path_options(backend: str | None = None) -> dict[str, str]:
    """``{option name: "model" or "file"}`` for the run's options and *backend*'s (default: every backend's)."""
    from .options import option_specs

    specs = option_specs([backend] if backend else None)
    return {name: spec.field.metadata["path"] for name, spec in specs.items() if spec.field.metadata.get("path")}


def reference(name: str, text: str) -> str:
    """The model or file reference in one value of option *name* (weights and names around it dropped)."""
    text = str(text).strip()
    try:
        if name == "clip":
            from guidance.encoders import parse_encoder_spec

            return parse_encoder_spec(text)[0]
        if name == "image_prompts":
            from guidance.prompts import parse_prompt

            return parse_prompt(text, "image").value
        if name == "rewards":
            from guidance.rewards import parse_reward_spec

            return parse_reward_spec(text)[1] or ""
    except ValueError:           # malformed: the whole value is the reference (generate() reports it)
        return text
    return text


def local_path(ref: str, kind: str = MODEL) -> str | None:
    """The local path inside reference *ref*, or ``None`` for a Hub id, a known name or an open_clip tag.

    A file reference is always a path; a model reference is one when it exists on disk or is written
    as one (absolute, ``./``, ``../``, ``~``), as the loaders read it."""
    ref = str(ref).strip()
    if not ref:
        return None
    if kind == FILE:
        return ref
    if ref.startswith("open_clip:"):
        from guidance.encoders import parse_open_clip_spec

        try:
            name, pretrained = parse_open_clip_spec(ref)
        except ValueError:
            return None
        if name.startswith("local-dir:"):
            return name[len("local-dir:"):]
        if pretrained and ("/" in pretrained or Path(pretrained).expanduser().exists()):
            return pretrained
        return None
    if ref.startswith(("/", "./", "../", "~", ".")) or Path(ref).expanduser().exists():
        return ref
    return None


def values(value: Any) -> list[str]:
    """The items of an option value (a list option's items, or the one value)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def references(opts: dict[str, Any], kinds: dict[str, str]) -> Iterator[tuple[str, str, str, str | None]]:
    """``(option, kind, reference, local path or None)`` for every reference in *opts*."""
    from guidance.build import is_none_word

    for name, kind in kinds.items():
        for text in values(opts.get(name)):
            if is_none_word(text) or (name == "eval_model" and text.strip().lower() == "auto"):
                continue
            ref = reference(name, text)
            if ref:
                yield name, kind, ref, local_path(ref, kind)


def map_local_paths(opts: dict[str, Any], kinds: dict[str, str], change: Callable[[str], str]) -> dict[str, Any]:
    """A copy of *opts* with the local path inside each reference replaced by ``change(path)``."""
    from guidance.build import is_none_word

    out = dict(opts)
    for name, kind in kinds.items():
        value = opts.get(name)
        if value is None:
            continue
        changed = []
        for text in values(value):
            ref = reference(name, text) if not is_none_word(text) else ""
            path = local_path(ref, kind) if ref else None
            changed.append(text.replace(path, change(path), 1) if path else text)
        out[name] = changed if isinstance(value, (list, tuple)) else changed[0]
    return out


__all__ = ["MODEL", "FILE", "path_options", "reference", "local_path", "values", "references", "map_local_paths"]
