"""Where runs go: a new folder per run, PNGs with their settings inside, a JSON sidecar,
intermediate frames and an animation (GIF through diffusers' ``export_to_gif``, MP4 through
imageio-ffmpeg's bundled ffmpeg).

Nothing here overwrites a file: run folders are made with an exclusive ``mkdir`` (a numeric
suffix is added when the name is taken) and files are opened in exclusive-create mode.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from guidance.evaluation.pairs import SIDECAR  # run.json: the evaluation reads run folders too

PNG_KEY = "clipsteer"  # PNG text chunk holding the whole metadata as JSON


def slugify(text: str, max_length: int = 48) -> str:
    """A short, filesystem-safe ASCII name from a prompt (``"A red fox:1|snow"`` -> ``"a-red-fox-snow"``)."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    text = re.sub(r":-?[0-9.]+", " ", text)                 # drop prompt weights
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    text = text[:max_length].rstrip("-")
    return text or "run"


def new_run_dir(out: str | Path, prompt: str = "", *, now: _dt.datetime | None = None) -> Path:
    """Create and return a new folder ``out/YYYYmmdd-HHMMSS-<slug>`` (``-2``, ``-3``... if taken)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output location {str(out)!r} is a file; give a folder with --out")
    out.mkdir(parents=True, exist_ok=True)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{slugify(prompt)}"
    for n in range(1, 10_000):
        folder = out / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"could not find a free run folder name under {str(out)!r}")


def to_pil(images: torch.Tensor) -> list:
    """``[B,3,H,W]`` (or ``[3,H,W]``) floats in ``[0,1]`` -> list of 8-bit RGB PIL images."""
    from PIL import Image

    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
    data = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(arr.numpy(), "RGB") for arr in data]


def to_jsonable(value: Any) -> Any:
    """Metadata as plain JSON types (paths, tuples, tensors, dataclasses, non-finite floats handled)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return str(value)


def save_png(image, path: str | Path, *, text: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save a PIL image (or ``[3,H,W]``/``[1,3,H,W]`` tensor) as PNG with text chunks.

    String values are stored as they are; other values as JSON. Long values are compressed.
    """
    from PIL.PngImagePlugin import PngInfo

    if isinstance(image, torch.Tensor):
        image = to_pil(image)[0]
    path = Path(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        value = value if isinstance(value, str) else json.dumps(to_jsonable(value))
        info.add_text(key, value, zip=len(value) > 1024)
    with open(path, "wb" if overwrite else "xb") as fh:
        image.save(fh, format="PNG", pnginfo=info)
    return path


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (``{"prompt": ..., "clipsteer": "<json>"}``)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})


def read_metadata(path: str | Path) -> dict:
    """clipsteer's metadata of a run: from a run folder (``run.json``), a sidecar, or a PNG's text chunk."""
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR
    if path.suffix.lower() == ".png":
        text = read_png_text(path)
        if PNG_KEY not in text:
            raise ValueError(f"{str(path)!r} has no clipsteer metadata; was it made by clipsteer?")
        return json.loads(text[PNG_KEY])
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; give a run folder, its run.json or its PNG")
    return json.loads(path.read_text())


def write_json(path: str | Path, data: Any, *, overwrite: bool = False) -> Path:
    """Write *data* as indented JSON; refuses to replace an existing file unless asked."""
    path = Path(path)
    with open(path, "w" if overwrite else "x", encoding="utf-8") as fh:
        json.dump(to_jsonable(data), fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return path


def image_name(index: int, seed: int) -> str:
    """A run's image file: its index in the run (5 digits) and its seed, A1111's way (``00001-6.png``)."""
    return f"{index:05d}-{seed}.png"


def frame_name(step: int) -> str:
    return f"step-{step:06d}.png"


def save_gif(frames: Sequence, path: str | Path, *, fps: float = 10.0, overwrite: bool = False) -> Path:
    """An animated, looping GIF of PIL frames through diffusers' ``export_to_gif`` (``1000 // fps`` ms a
    frame; *fps* capped at 50, as players show shorter frames at 100 ms). The last frame is held for about a
    second: it is repeated, and Pillow stores repeated frames as one longer frame."""
    from diffusers.utils import export_to_gif

    if not frames:
        raise ValueError("no frames to animate; use --save-every N to keep frames during the run")
    path = Path(path)
    fps = min(float(fps), 50.0)
    frames = list(frames) + [frames[-1]] * max(0, math.ceil(fps) - 1)
    open(path, "wb" if overwrite else "xb").close()      # never replaces a file unless asked
    try:
        export_to_gif(frames, str(path), fps=fps)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def save_mp4(frames: Sequence, path: str | Path, *, fps: float = 10.0, overwrite: bool = False) -> Path:
    """An H.264 MP4 of PIL frames through imageio-ffmpeg's bundled ffmpeg (no system ffmpeg needed).

    Not diffusers' ``export_to_video``: it needs the ``imageio`` package (clipsteer needs only
    imageio-ffmpeg), and without it falls back, with a warning, to OpenCV, which clipsteer does not install.
    """
    if not frames:
        raise ValueError("no frames to animate; use --save-every N to keep frames during the run")
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ImportError("MP4 output needs the imageio-ffmpeg package (it bundles ffmpeg): "
                          "pip install imageio-ffmpeg, or use --animation gif") from None
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; not overwriting it")
    width, height = frames[0].size
    # H.264 in yuv420p needs even sides: odd-sized frames are stretched by one pixel.
    size = (width + width % 2, height + height % 2)
    writer = imageio_ffmpeg.write_frames(str(path), size, fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=1, quality=8, ffmpeg_log_level="error")
    writer.send(None)
    try:
        from PIL import Image

        for frame in frames:
            frame = frame.convert("RGB")
            if frame.size != size:
                frame = frame.resize(size, Image.Resampling.NEAREST)
            writer.send(frame.tobytes())
    finally:
        writer.close()
    return path


def save_animation(frames: Sequence, path: str | Path, *, fps: float = 10.0, overwrite: bool = False) -> Path:
    """GIF or MP4, chosen by *path*'s suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return save_gif(frames, path, fps=fps, overwrite=overwrite)
    if suffix == ".mp4":
        return save_mp4(frames, path, fps=fps, overwrite=overwrite)
    raise ValueError(f"unknown animation format {suffix!r}; use .gif or .mp4")


def animation_formats(spec: str | Iterable[str] | None) -> list[str]:
    """``"none"``, ``"gif"``, ``"mp4"``, ``"both"`` or ``"gif,mp4"`` -> list of formats."""
    if spec is None:
        return []
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    formats: list[str] = []
    for item in items:
        item = item.lower().lstrip(".")
        if item in ("none", "", "false", "no"):
            continue
        if item == "both":
            formats += ["gif", "mp4"]
        elif item in ("gif", "mp4"):
            formats.append(item)
        else:
            raise ValueError(f"unknown animation format {item!r}; use none, gif, mp4 or both")
    return list(dict.fromkeys(formats))


__all__ = ["SIDECAR", "PNG_KEY", "slugify", "new_run_dir", "to_pil", "to_jsonable", "save_png", "read_png_text",
           "read_metadata", "write_json", "image_name", "frame_name", "save_gif", "save_mp4", "save_animation",
           "animation_formats"]
