"""The one image reader: files and PIL images of every mode PIL opens -> RGB tensors.

Init images, image prompts and evaluation all read through here, so they agree on colours and
sizes. 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``) are rescaled from their own range to
8 bits (``convert("RGB")`` would clip them to white); palette, ``LA``, ``RGBA``, ``CMYK``, ``1``
and ``YCbCr`` go through PIL's own conversion (alpha is dropped). Resizing, where asked, is
PIL's Lanczos filter on the 8-bit image, in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import first_line

_HIGH_DEPTH_RANGES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}


def pil_to_rgb8(im) -> np.ndarray:
    """A PIL image of any mode -> ``[H, W, 3]`` uint8 RGB array."""
    mode = im.mode
    if mode in _HIGH_DEPTH_RANGES or mode in ("I", "F") or mode.startswith("I;"):
        arr = np.asarray(im, dtype=np.float64)
        if mode in ("I", "F"):
            # 16-bit PNGs open as "I" with values in [0, 65535]; float images are usually [0, 1].
            high = float(arr.max()) if arr.size else 0.0
            scale = 1.0 if (mode == "F" and high <= 1.0) else (255.0 if high <= 255.0 else 65535.0)
        else:
            scale = _HIGH_DEPTH_RANGES.get(mode, 65535.0)
        grey = np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _open(path: str | Path, what: str):
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder, not an image file; give the path of a PNG/JPEG/WebP file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist; check the path")
    try:
        im = Image.open(path)
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{what} {str(path)!r} is not a readable image ({first_line(err, 120)}); "
                         "re-save it as PNG/JPEG/WebP") from None


def check_image_file(path: str | Path, what: str = "image") -> Path:
    """Raise a one-line error (naming *what*) unless *path* is a readable image file."""
    with _open(path, what) as im:
        pil_to_rgb8(im)
    return Path(path).expanduser()


def _resize(im, size):
    from PIL import Image

    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if im.size == (width, height):
        return im
    return im.resize((width, height), Image.Resampling.LANCZOS)


def read_image(path: str | Path, size: int | Sequence[int] | None = None, *, what: str = "image") -> torch.Tensor:
    """An image file as a ``[3, H, W]`` uint8 RGB tensor; *size* (``N`` or ``(W, H)``) resizes it."""
    from PIL import Image

    with _open(path, what) as im:
        arr = pil_to_rgb8(im)
    if size is not None:
        arr = np.asarray(_resize(Image.fromarray(arr), size), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, size: int | Sequence[int] | None = None, *, what: str = "image") -> torch.Tensor:
    """An image file as ``[1, 3, H, W]`` float32 in ``[0, 1]`` (resized to *size* if given)."""
    return read_image(path, size, what=what).float().div(255).unsqueeze(0)


def pil_to_tensor(im) -> torch.Tensor:
    """A PIL image (any mode) as a ``[3, H, W]`` uint8 RGB tensor."""
    return torch.from_numpy(pil_to_rgb8(im).copy()).permute(2, 0, 1).contiguous()


__all__ = ["read_image", "load_image", "check_image_file", "pil_to_tensor", "pil_to_rgb8"]
