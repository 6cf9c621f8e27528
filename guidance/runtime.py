"""Device and precision choices shared by every part of clipsteer.

Nothing here runs at import time: devices are probed only when a function is called.

Mixed precision (``--precision bf16|fp16``): the CLIP towers, the UNet and the text encoders hold their
weights in the half dtype, and the hot loops run the CLIP image towers and the decoders (VQGAN, Stable
Diffusion VAE, tiny VAE) under :func:`autocast` in that dtype, so matrix products and convolutions run in
half precision while autocast keeps reductions and normalisations in float32 on CUDA (CPU autocast runs them
in the half dtype, accumulating in float32). The optimised latents, the
optimiser state, the scheduler arithmetic and every loss stay float32 (the master copy). fp16 needs loss
scaling: the latent optimiser uses ``torch.amp.GradScaler``, the diffusion guiders a fixed 2**10 scale.
The casts a step makes are deliberate: the decoded image comes back to float32 for the cutouts and
augmentations (torchvision's ``roi_align`` has no CPU bf16 kernel, and kornia's augmentations ran no faster in
bf16), and the cutout batch is cast once into the tower's dtype; inside the tower nothing changes dtype.

``--precision auto`` (the default): :func:`choose_precision` picks, per device, the fastest precision that keeps
quality, from what torch reports about the device (:func:`device_capabilities`; the rule itself,
:func:`auto_precision`, is a pure function of that report): bf16 on a CUDA GPU that runs it natively (Ampere
and newer), else fp16 (a VAE that asks for float32, ``force_upcast``, decodes in float32); bf16 on a CPU with
native bf16 instructions (AVX-512 BF16 or AMX, as oneDNN uses them), else fp32; fp16 on Apple MPS. An explicit
``--precision`` always wins.

``--compile``: :func:`set_compiled` compiles modules in place with ``torch.compile`` (``nn.Module.compile``);
the backend is ``inductor`` unless ``CLIPSTEER_COMPILE_BACKEND`` names another (``aot_eager``: tracing only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Capabilities:
    """What torch reports about one device: the inputs of the ``--precision auto`` rule."""

    device_type: str
    #: CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (compute capability 8.0 and newer)
    cuda_bf16: bool = False
    #: CPU: ``torch.cpu._is_avx512_bf16_supported()`` (AVX-512 BF16 dot products)
    cpu_avx512_bf16: bool = False
    #: CPU: ``torch.cpu._is_amx_tile_supported()`` (AMX tiles, which oneDNN uses for bf16 matrix products)
    cpu_amx: bool = False
    #: MPS: ``torch.amp.is_autocast_available("mps")`` (autocast runs on it)
    mps_autocast: bool = False
    name: str = ""


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses, what was asked for and why."""

    precision: str          # fp32, bf16 or fp16
    asked: str              # what the user gave (auto, or an explicit precision)
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def as_dict(self) -> dict[str, str]:
        return {"used": self.precision, "asked": self.asked, "reason": self.reason}

    def __str__(self) -> str:
        return f"precision {self.asked}: {self.precision} ({self.reason})"


def device_capabilities(device: str | torch.device) -> Capabilities:
    """Ask torch what *device* runs natively (no strings parsed where torch can tell)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        with torch.cuda.device(dev):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return Capabilities("cuda", cuda_bf16=bool(bf16), name=name)
    if dev.type == "cpu":
        cpu = torch.cpu
        avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        return Capabilities("cpu", cpu_avx512_bf16=bool(avx512_bf16), cpu_amx=bool(amx),
                            name=torch.backends.cpu.get_cpu_capability())
    if dev.type == "mps":
        return Capabilities("mps", mps_autocast=bool(torch.amp.is_autocast_available("mps")), name="mps")
    return Capabilities(dev.type, name=dev.type)


def auto_precision(caps: Capabilities) -> PrecisionChoice:
    """The ``--precision auto`` rule: the fastest precision that keeps quality on a device like *caps*.

    - CUDA: bf16 where the GPU runs it natively (Ampere and newer: fp32's range, no loss scaling), else fp16,
      as diffusers users pass ``torch_dtype=torch.float16`` (a VAE with ``force_upcast`` decodes in fp32,
      see ``generators.diffusion.pipeline.decoder_dtype``; the latent optimiser scales its loss).
    - CPU: bf16 where the CPU has native bf16 instructions (AMX or AVX-512 BF16, what oneDNN uses for bf16
      matrix products and convolutions); elsewhere bf16 is emulated and slower than fp32, so fp32.
    - MPS: fp16 where autocast runs on MPS, else fp32.
    """
    kind = caps.device_type
    if kind == "cuda":
        if caps.cuda_bf16:
            return PrecisionChoice("bf16", "auto", f"{caps.name or 'this GPU'} runs bf16 natively")
        return PrecisionChoice("fp16", "auto", f"{caps.name or 'this GPU'} has no native bf16 (before Ampere); "
                                               "fp16 with loss scaling, VAEs that ask for fp32 upcast")
    if kind == "cpu":
        native = [label for label, on in (("AMX", caps.cpu_amx), ("AVX-512 BF16", caps.cpu_avx512_bf16)) if on]
        if native:
            return PrecisionChoice("bf16", "auto", f"this CPU runs bf16 natively ({' and '.join(native)})")
        return PrecisionChoice("fp32", "auto", "this CPU has no native bf16 instructions (AMX or AVX-512 BF16), "
                                               "where bf16 is emulated and slower than fp32")
    if kind == "mps":
        if caps.mps_autocast:
            return PrecisionChoice("fp16", "auto", "Apple MPS runs fp16 under autocast")
        return PrecisionChoice("fp32", "auto", "this torch has no autocast on MPS")
    return PrecisionChoice("fp32", "auto", f"no half-precision rule for {kind} devices")


def _precision_name(precision: str | torch.dtype) -> str:
    if isinstance(precision, torch.dtype):
        names = {v: k for k, v in _DTYPES.items() if k in PRECISIONS}
        if precision not in names:
            raise ValueError(f"unsupported dtype {precision}; use torch.float32, torch.bfloat16 or torch.float16")
        return names[precision]
    key = str(precision).lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, fp16 or bf16")
    return next(k for k in PRECISIONS if _DTYPES.get(k) == _DTYPES[key])


def choose_precision(precision: str | torch.dtype | None, device: str | torch.device) -> PrecisionChoice:
    """The precision of a run on *device*: an explicit one always wins (fp16 refused on the CPU); ``"auto"``
    follows :func:`auto_precision` for what torch reports about the device; ``None`` is fp32 (the library's
    default for models loaded outside a run)."""
    dev = torch.device(device)
    if precision is None:
        return PrecisionChoice("fp32", "fp32", "the default outside a run")
    if isinstance(precision, str) and precision.lower() == "auto":
        return auto_precision(device_capabilities(dev))
    name = _precision_name(precision)
    if name == "fp16" and dev.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use --precision fp32, bf16 or auto")
    return PrecisionChoice(name, name, "asked for")


def resolve_dtype(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The model dtype of :func:`choose_precision` (``None``: float32; ``"auto"``: the device's rule)."""
    return choose_precision(precision, device).dtype


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
