"""Will the run fit? A lower bound on a run's memory from its size, checked before any model loads.

What grows with the image is what a step keeps at full resolution: the image and its optimiser state
(``pixels``: the logits, their gradient and Adam's two moments, 4 x 3 floats a pixel, and the rendered
image kept for the backward pass), or a decoder's last stage (VQGAN's taming decoder and the SD VAE both
run 128 channels at full resolution; the backward pass keeps at least four such activations, 4 x 128
floats a pixel). Model weights and attention come on top, so the bound is optimistic: a size it refuses
cannot fit, and one it lets through may still not. It exists to refuse ``--size 100000 100000`` in one
line instead of a traceback after minutes (or a host brought down), and to say which size fits.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: bytes a pixel of one image needs at least, per backend (others: the pixels backend's)
BYTES_PER_PIXEL = {"pixels": 4 * 3 * 4 + 3 * 4, "vqgan": 4 * 128 * 4, "sd": 4 * 128 * 4, "noise": 4 * 128 * 4}
#: what lowers it, per backend
HELPS = {"vqgan": "--precision bf16 (or fp16 on a GPU) halves the decoder's activations",
         "sd": "--vae-tiling decodes in tiles; --precision fp16 halves the activations",
         "noise": "--precision fp16 on a GPU halves the activations"}
MULTIPLE = 16                      # sizes suggested are multiples of 16: every backend accepts them


def available_bytes(device: torch.device) -> int | None:
    """Memory free for the run on *device* (CUDA: free device memory; CPU: the OS's available memory),
    or ``None`` where it cannot be told (then nothing is refused)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def needed_bytes(backend: str, width: int, height: int, images: int = 1, precision: str = "auto") -> int:
    """The lower bound on a run's memory (see the module docstring)."""
    per_pixel = BYTES_PER_PIXEL.get(backend, BYTES_PER_PIXEL["pixels"])
    if backend != "pixels" and precision in ("fp16", "bf16"):
        per_pixel //= 2
    return per_pixel * width * height * max(1, images)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n < 1e12 else f"{n / 1e12:.1f} TB"


def check_fits(backend: str, settings: Any, device: torch.device, precision: str = "auto", *,
               available: int | None = None) -> None:
    """One-line ``ValueError`` when *settings*' size cannot fit in the memory free on *device*, naming the
    largest size (same aspect ratio) that can and the option that helps. Sizes of 0 (the model's own) are
    not checked here."""
    width, height = int(getattr(settings, "width", 0) or 0), int(getattr(settings, "height", 0) or 0)
    if width <= 0 or height <= 0:
        return
    images = int(getattr(settings, "num_images", 1) or 1)
    available = available_bytes(device) if available is None else available
    need = needed_bytes(backend, width, height, images, precision)
    if available is None or need <= available:
        return
    scale = math.sqrt(available / need)
    fit_w, fit_h = (max(MULTIPLE, int(side * scale) // MULTIPLE * MULTIPLE) for side in (width, height))
    batch = f" x {images} images" if images > 1 else ""
    helps = [f"--size {fit_w} {fit_h}"] + (["--num-images 1"] if images > 1 else []) + \
        ([HELPS[backend]] if backend in HELPS else [])
    raise ValueError(f"--size {width} {height}{batch} needs at least {_gb(need)} of memory on {device} and "
                     f"{_gb(available)} is free; the largest size that fits is about {fit_w}x{fit_h}: use "
                     + "; or ".join(helps))


__all__ = ["BYTES_PER_PIXEL", "available_bytes", "check_fits", "needed_bytes"]
