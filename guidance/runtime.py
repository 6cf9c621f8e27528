"""Device and precision choices shared by every part of clipsteer.

Nothing here runs at import time: devices are probed only when a function is called.
"""

from __future__ import annotations

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
