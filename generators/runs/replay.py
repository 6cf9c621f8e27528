"""Replay: the options of an earlier image or run, to generate it again (``--from`` / ``generate(from_=...)``).

    generate.py --from outputs/20260101-120000-a-fox/00000-5.png            (the same image again)
    generate.py --from outputs/20260101-120000-a-fox/run.json --seed 9      (that run, another seed)

A clipsteer PNG gives the options of its own image (its seed, one image); a run.json or run folder gives the
whole run (every seed). The options are handed to :func:`generators.runs.session.generate` as a config mapping, so
anything given besides overrides them, as it overrides a ``--config`` file. Local paths recorded relative to
the run folder are resolved against it; a preset's models come from the preset again. A PNG written by
AUTOMATIC1111 (a ``parameters`` chunk and no clipsteer one) gives what maps onto clipsteer's ``sd`` backend:
prompt, negative prompt, steps, CFG scale, seed, size and a known sampler (:mod:`generators.runs.infotext`).
Nothing is unpickled: PNG text chunks and JSON only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: recorded options a replay leaves to this machine and this command line
NOT_REPLAYED = ("out", "progress", "threads", "device")


def _metadata(path: Path) -> tuple[dict, int | None]:
    """The clipsteer metadata of a PNG, run.json or run folder, and the PNG's image index (None: the whole run);
    an A1111 PNG as ``{"a1111": text}``."""
    from .infotext import PARAMETERS_KEY
    from .outputs import PNG_KEY, SIDECAR, read_png_text

    if path.is_dir():
        path = path / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; give --from a clipsteer PNG, a run.json or a run folder")
    if path.suffix.lower() == ".png":
        try:
            text = read_png_text(path)
        except Exception as err:
            raise ValueError(f"{str(path)!r} is not a readable PNG ({err.__class__.__name__}); give --from a PNG, "
                             "a run.json or a run folder") from None
        if PNG_KEY in text:
            meta = _json(text[PNG_KEY], path)
            return meta, int(meta.get("index") or 0)
        if PARAMETERS_KEY in text:
            return {"a1111": text[PARAMETERS_KEY]}, None
        raise ValueError(f"{str(path)!r} has no clipsteer or A1111 settings (no 'clipsteer' or 'parameters' text "
                         "chunk); give --from a PNG written by clipsteer or AUTOMATIC1111, or a run.json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not a run.json (not UTF-8 text); give --from a PNG, a run.json or "
                         "a run folder") from None
    return _json(text, path), None


def _json(text: str, path: Path) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} holds no valid JSON settings ({err.msg}); give --from a clipsteer PNG, "
                         "a run.json or a run folder") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict) or not meta.get("backend"):
        raise ValueError(f"{str(path)!r} has no clipsteer run settings; give --from a clipsteer PNG, a run.json "
                         "or a run folder")
    return meta


def replay_config(source: str | Path) -> dict[str, Any]:
    """The options that regenerate *source* (a PNG, run.json or run folder), as a config mapping:
    ``backend``, ``preset``, every recorded option, and ``seeds`` when a run's seeds were not consecutive."""
    from .infotext import options_from_parameters
    from .record import read_back

    path = Path(source).expanduser()
    meta, index = _metadata(path)
    if "a1111" in meta:
        return {"backend": "sd", **options_from_parameters(meta["a1111"])}
    folder = path if path.is_dir() else path.parent
    sources = meta.get("option_sources") if isinstance(meta.get("option_sources"), dict) else {}
    config: dict[str, Any] = {k: v for k, v in read_back(meta["settings"], sources, folder).items()
                              if k not in NOT_REPLAYED}
    config["backend"] = meta["backend"]
    if meta.get("preset"):
        config["preset"] = meta["preset"]
    if index is not None:                   # one PNG: its own image (its seed), alone
        config["seed"] = meta["seed"]
        if "num_images" in config:
            config["num_images"] = 1
    else:
        seeds = [int(s) for s in meta.get("seeds") or []]
        if seeds and seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            config["seeds"] = seeds
    return config


def replay(source: str | Path, **overrides):
    """Generate *source*'s image or run again (:func:`replay_config`); keyword options override its own."""
    from .session import generate

    return generate(from_=source, **overrides)


__all__ = ["replay", "replay_config", "NOT_REPLAYED"]
