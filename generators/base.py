"""What every generator backend provides, and what it hands back.

A backend is a :class:`Generator` subclass with a ``Settings`` dataclass. Each settings
field carries ``metadata={"help": "..."}`` (and optionally ``"flag"`` for its CLI
spelling); ``scripts/generate.py`` builds its options from these, and a field of the same
name in several backends is one shared option (``width``, ``height``, ``init_image``).

The backend receives a ready :class:`guidance.CLIPLoss` (or ``None`` for no CLIP
guidance) and never builds one itself: the guidance knows nothing about generators and
generators know nothing about how prompts become targets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch


@dataclass
class StepInfo:
    """Handed to the step callback after every step.

    ``loss`` is a device tensor (or ``None`` when the step had no CLIP loss); converting it
    with ``float()`` syncs the host, so callbacks should do that only when they log.
    ``decode()`` renders the current state as images ``[B,3,H,W]`` in ``[0,1]``; it costs a
    decoder pass, so call it only for frames you keep.
    """

    step: int
    total: int
    latents: torch.Tensor
    decode: Callable[[], torch.Tensor]
    loss: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


# Return ``False`` to stop the run early (the current state is kept as the result).
StepCallback = Callable[[StepInfo], "bool | None"]


@dataclass
class GenerationResult:
    """Final images ``[B,3,H,W]`` in ``[0,1]`` (float32, on the CPU) and facts about the run."""

    images: torch.Tensor
    losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


class Generator(ABC):
    """A backend: built once from its settings (loads models), then ``generate`` any number of times."""

    name: ClassVar[str]
    Settings: ClassVar[type]

    def __init__(self, settings: Any = None, *, device: str | torch.device | None = None,
                 precision: str | torch.dtype | None = None):
        from guidance import resolve_device, resolve_dtype

        self.settings = settings if settings is not None else self.Settings()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)

    @abstractmethod
    def generate(self, clip_loss, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        """Run one generation steered by ``clip_loss`` (a ``guidance.CLIPLoss`` or ``None``)."""

    @classmethod
    def settings_from(cls, options: dict[str, Any]) -> Any:
        """Build ``Settings`` from a dict, ignoring keys other backends own; unknown types are not coerced."""
        names = {f.name for f in fields(cls.Settings)}
        return cls.Settings(**{k: v for k, v in options.items() if k in names and v is not None})
