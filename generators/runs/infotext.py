"""The AUTOMATIC1111 "infotext": the ``parameters`` PNG text chunk that A1111, ComfyUI, Civitai and most
image viewers show, written for every clipsteer PNG and read back from clipsteer's and A1111's PNGs.

The text is the prompt (one or more lines), a ``Negative prompt: ...`` line when there is one, and one last
line of ``Key: value`` pairs separated by ``", "``::

    a red circle:1|blurry:-0.5
    Negative prompt: blue
    Steps: 30, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 5, Size: 64x64, Model hash: 0123456789, Model: sd, ...

A value holding a comma, a colon or a line break is written as a JSON string (in double quotes), which is how
A1111 quotes its own. clipsteer's guidance values follow as extra pairs (``Backend``, ``Guider``, ``CLIP
guidance scale``, ``CLIP``, ``Cutouts``...). The VQGAN and pixel backends write their iterations as ``Steps``
and their optimiser as ``Sampler``.

**Model hash** follows A1111's "AutoV2": the first 10 hex digits of the SHA-256 of the weights file. For a
folder (a diffusers model, a transformers CLIP, a VQGAN folder) clipsteer's rule is: the SHA-256 of the
``sha256sum``-style listing of its weights files (``*.safetensors``, ``*.bin``, ``*.ckpt``, ``*.pt``,
``*.pth``, every sub-folder), one ``"<hex digest>  <path relative to the folder, with />\\n"`` line per file,
sorted by path; again the first 10 hex digits. A Hub id that is not a local path has no hash recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

PARAMETERS_KEY = "parameters"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
#: the option naming each backend's main model ("Model:"); a backend without one names its first CLIP
MODEL_OPTION = {"sd": "sd_model", "noise": "sd_model", "vqgan": "vqgan"}
#: clipsteer's --scheduler names and A1111's sampler names for the same sampler
SAMPLER_NAMES = {"ddim": "DDIM", "pndm": "PLMS", "dpm++": "DPM++ 2M", "euler": "Euler", "euler_a": "Euler a",
                 "lms": "LMS", "unipc": "UniPC"}
# A pair of the last line: a key starting with a word character, then letters, digits, spaces, '-' or '/';
# the value a JSON string or anything up to the next comma (the format A1111 writes and parses).
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")

_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def model_hash(path: str | os.PathLike | None) -> str | None:
    """The model hash of a local weights file or folder (module docstring), or ``None`` (not local, no weights)."""
    if not path:
        return None
    path = Path(os.path.expanduser(str(path)))
    if path.is_file():
        return _file_sha256(path)[:10]
    if not path.is_dir():
        return None
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        return None
    listing = "".join(f"{_file_sha256(p)}  {p.relative_to(path).as_posix()}\n" for p in files)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()[:10]


def main_model(backend: str, opts: Mapping[str, Any]) -> str | None:
    """The value of the run's main model option (the SD model, the VQGAN, else the first guiding CLIP)."""
    name = MODEL_OPTION.get(backend)
    if name and opts.get(name):
        return str(opts[name])
    from .paths import reference

    clips = [c for c in (opts.get("clip") or []) if str(c).lower() not in ("none", "off")]
    return reference("clip", str(clips[0])) if clips else None      # its weight dropped


def model_record(backend: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name", "hash"}`` of the run's main model: its folder or file name (a Hub id as it is) and hash."""
    value = main_model(backend, opts)
    if value is None:
        return {"name": None, "hash": None}
    local = Path(os.path.expanduser(value))
    name = local.name if local.exists() else value
    return {"name": name, "hash": model_hash(local) if local.exists() else None}


def quote(value: Any) -> str:
    """A value as the last line holds it: as it is, or as a JSON string when it has ``,``, ``:`` or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n\r") else text


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_parameters(meta: Mapping[str, Any], *, seed: int, size: tuple[int, int]) -> str:
    """The ``parameters`` text of one image of a run (*meta*: the run's metadata, as run.json holds it)."""
    settings = meta.get("settings") or {}
    backend = meta.get("backend")
    prompt = str(meta.get("prompt") or "").strip()
    lines = [prompt.replace("\r", "")]
    negative = str(settings.get("negative_prompt") or "").strip()
    if negative:
        lines.append("Negative prompt: " + negative.replace("\n", " "))
    steps = settings.get("steps") if backend == "sd" else settings.get("iterations", settings.get("steps"))
    if backend == "sd" or "iterations" not in settings:
        sampler = SAMPLER_NAMES.get(str(settings.get("scheduler")), settings.get("scheduler"))
    else:
        sampler = settings.get("optimizer")
    model = meta.get("model") or {}
    pairs: list[tuple[str, Any]] = [
        ("Steps", steps), ("Sampler", sampler), ("CFG scale", settings.get("cfg_scale")), ("Seed", seed),
        ("Size", f"{size[0]}x{size[1]}"), ("Model hash", model.get("hash")), ("Model", model.get("name")),
        ("Backend", backend)]
    if backend == "noise":
        pairs.append(("Render steps", settings.get("render_steps")))
    if "learning_rate" in settings:
        pairs.append(("Learning rate", settings.get("learning_rate")))
    if backend == "sd":
        used = (meta.get("info") or {}).get("clip_guidance_scale")       # the guider's own default when unset
        pairs += [("Guider", settings.get("guider")),
                  ("CLIP guidance scale", settings.get("clip_guidance_scale") if used is None else used)]
    clips = [c for c in settings.get("clip") or [] if str(c).lower() not in ("none", "off")]
    pairs += [("CLIP", " + ".join(map(str, clips)) or None), ("Rewards", " + ".join(settings.get("rewards") or []) or None),
              ("Cutouts", settings.get("cutouts") if clips else None), ("Cut pow", settings.get("cut_pow") if clips else None)]
    for name in ("tv_weight", "range_weight", "saturation_weight", "symmetry_weight"):
        if settings.get(name):
            pairs.append((name.replace("_", " ").capitalize().replace("Tv", "TV"), settings[name]))
    if settings.get("init_image"):
        pairs.append(("Init image", Path(str(settings["init_image"])).name))
    if settings.get("layout_sketch"):
        pairs.append(("Layout sketch", settings["layout_sketch"]))
    if settings.get("init_image") or settings.get("layout_sketch"):
        pairs.append(("Denoising strength", settings.get("strength")))     # A1111's name for img2img's strength
    if meta.get("clip_score") is not None:
        pairs.append(("CLIP score", round(float(meta["clip_score"]), 4)))
    version = (meta.get("versions") or {}).get("clipsteer")
    pairs.append(("Version", f"clipsteer {version}" if version else "clipsteer"))
    lines.append(", ".join(f"{key}: {quote(_number(value))}" for key, value in pairs if value not in (None, "")))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """An infotext as ``{"Prompt": ..., "Negative prompt": ..., "Steps": "30", ..., "Size-1": "512", ...}``:
    the last line is the pairs when it holds at least three of them, else it belongs to the prompt."""
    *lines, last = str(text).strip().split("\n")
    if len(PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:"):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PAIR.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        size = SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        out[key] = value
    return out


def options_from_parameters(text: str) -> dict[str, Any]:
    """The settings of an A1111 infotext that map to clipsteer's options (diffusers' names where the option
    depends on the backend): prompt, negative prompt, steps, CFG scale, seed, size and a known sampler."""
    parsed = parse_parameters(text)
    out: dict[str, Any] = {"prompt": parsed["Prompt"] or None}
    if parsed["Negative prompt"]:
        out["negative_prompt"] = parsed["Negative prompt"]
    for key, name, kind in (("Steps", "num_inference_steps", int), ("CFG scale", "guidance_scale", float),
                            ("Seed", "seed", int), ("Size-1", "width", int), ("Size-2", "height", int)):
        if key in parsed:
            try:
                out[name] = kind(float(parsed[key])) if kind is int else kind(parsed[key])
            except ValueError:
                raise ValueError(f"the PNG's parameters say {key.split('-')[0]}: {parsed[key]!r}, which is not a "
                                 "number; give that option on the command line instead") from None
    by_a1111 = {v.lower(): k for k, v in SAMPLER_NAMES.items()}
    sampler = str(parsed.get("Sampler", "")).strip().lower()
    if sampler in by_a1111:
        out["scheduler"] = by_a1111[sampler]
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["PARAMETERS_KEY", "MODEL_OPTION", "SAMPLER_NAMES", "PAIR", "model_hash", "main_model", "model_record",
           "format_parameters", "parse_parameters", "options_from_parameters"]
