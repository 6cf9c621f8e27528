"""Device and precision choices shared by every part of clipsteer.

Nothing here runs at import time: devices are probed only when a function is called.

Mixed precision (``--precision bf16|fp16``): the CLIP towers, the UNet and the text encoders hold their
weights in the half dtype, and the hot loops run the CLIP image towers and the decoders (VQGAN, Stable
Diffusion VAE, tiny VAE) under :func:`autocast` in that dtype, so matrix products and convolutions run in
half precision while autocast keeps reductions and normalisations in float32. The optimised latents, the
optimiser state, the scheduler arithmetic and every loss stay float32 (the master copy). fp16 needs loss
scaling: the latent optimiser uses ``torch.amp.GradScaler``, the diffusion guiders a fixed 2**10 scale.

``--compile``: :func:`set_compiled` compiles modules in place with ``torch.compile`` (``nn.Module.compile``);
the backend is ``inductor`` unless ``CLIPSTEER_COMPILE_BACKEND`` names another (``aot_eager``: tracing only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import torch

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA, then Apple MPS, then the CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for but MPS is not available here; use --device cpu")
    return dev


def resolve_dtype(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Model precision: fp32 unless asked; half precision only where the device runs it well."""
    if isinstance(precision, torch.dtype):
        dtype = precision
    elif precision is None or precision == "auto":
        return torch.float32
    else:
        key = str(precision).lower()
        if key not in _DTYPES:
            raise ValueError(f"unknown precision {precision!r}; use fp32, fp16 or bf16")
        dtype = _DTYPES[key]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use --precision fp32 or bf16")
    return dtype


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on *device* seeded with *seed* (CPU by default, so a seed means
    the same numbers on every machine)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """*tensor* (made on the host) on *device*, without making the host wait for the device's queued work:
    a host-to-CUDA copy is non-blocking (CUDA stages the pageable source before returning)."""
    return tensor.to(device, dtype, non_blocking=tensor.device.type == "cpu" and torch.device(device).type == "cuda")


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` in *dtype* on *device* for a half dtype; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def compile_backend() -> str:
    """The ``torch.compile`` backend of ``--compile``: ``CLIPSTEER_COMPILE_BACKEND`` or ``inductor``."""
    return os.environ.get("CLIPSTEER_COMPILE_BACKEND", "inductor")


def set_compiled(modules: Iterable[torch.nn.Module], on: bool) -> None:
    """Compile each module in place (its ``__call__``; weights and state-dict keys unchanged), or undo that.

    Set both ways: models are cached across runs, so a run without ``--compile`` must not inherit one. A
    module keeps its compiled wrapper (per backend) when switched off, so switching it back on reuses the
    code already compiled for it instead of compiling again."""
    backend = compile_backend()
    for module in modules:
        kept = module.__dict__.setdefault("_clipsteer_compiled", {})
        if not on:
            module._compiled_call_impl = None
        elif backend in kept:
            module._compiled_call_impl = kept[backend]
        else:
            module.compile(backend=backend, dynamic=False)
            kept[backend] = module._compiled_call_impl
