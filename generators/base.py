"""What every generator backend provides and hands back: the one contract of clipsteer's backends.

A backend is a :class:`Generator` subclass with a ``Settings`` dataclass whose fields are declared
with :func:`option` (its help becomes a ``--flag``, a config-file key and a UI field; a field of
the same name in several backends is one shared option, e.g. ``width``). It registers with
``generators.register("name", Class)`` and runs through ``generators.runs.generate``.

The contract, tested for every registered backend by one parametrised test:

- ``generate(objective, *, seed, callback)`` runs one generation steered by an
  :class:`guidance.Objective` (or ``None``: unsteered). A backend never reads an objective's
  internals: it calls ``objective(images, step=, generator=)`` and, to condition on text,
  ``objective.conditioning_text(step)``.
- :class:`GenerationResult`: ``images`` ``[B,3,H,W]`` float32 CPU in ``[0,1]``; ``losses`` one
  float per step at which the objective was evaluated, the *mean over images* of its
  ``per_image`` loss (plus any regulariser); ``steps_done``; ``stopped_at`` (the step at which a
  callback returned ``False``, else ``None``); ``interrupted`` is True only for Ctrl-C.
- Seeding: :func:`seed_generator` derives every random stream from ``--seed`` by one rule:
  stream ``"init"`` (starting latents, a sampler's own noise) is ``torch.Generator().manual_seed(seed)``
  itself, so a seed gives the same noise as diffusers with that generator; every other stream
  (``"objective"``: cutouts and augmentations) is seeded with ``sha256(f"{seed}/{stream}")`` mod
  2**63, so streams never collide and never overflow. Seeds are whole numbers in ``[0, 2**64 - 1]``.
- Presets: ``presets = {"toy": callable}`` on the class gives this backend's own part of a named
  preset (model paths, tuned steps); the shared part lives in :mod:`generators.runs.presets`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch

SEED_MAX = 2**64 - 1


def check_seed(seed: Any, name: str = "seed") -> int:
    """*seed* as an int in ``[0, 2**64 - 1]``, or a one-line ``ValueError`` naming the option."""
    bad = ValueError(f"{name} must be a whole number from 0 to 2**64-1; got {seed!r}")
    if isinstance(seed, bool) or (isinstance(seed, float) and not seed.is_integer()):
        raise bad
    try:
        value = int(seed.strip()) if isinstance(seed, str) else int(seed)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name} {value} is out of range; use a whole number from 0 to 2**64-1 "
                         f"({SEED_MAX})")
    return value


def stream_seed(seed: int, stream: str = "init") -> int:
    """The seed of random stream *stream* of a run seeded with *seed* (see the module docstring)."""
    seed = check_seed(seed)
    if stream == "init":
        return seed
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_generator(seed: int, stream: str = "init", device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` for stream *stream* of a run seeded with *seed* (CPU by default, so a seed
    means the same numbers on every machine)."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream))


def option(default: Any = None, help: str = "", *, flag: str | None = None, group: str | None = None,
           choices=None, metavar: str | None = None, aliases=None, positional: bool = False,
           minimum: float | None = None, maximum: float | None = None, above: float | None = None, **meta):
    """A settings field whose metadata becomes the CLI option, the config key and the UI field.

    ``default`` may be a value or a factory (``list``, a lambda) for mutable defaults. ``minimum`` /
    ``maximum`` (inclusive) and ``above`` (exclusive) bound numbers; numbers must be finite. ``choices`` may be
    a function returning them (a registry's names, read when the command line and the web form are built).
    """
    meta = dict(meta, help=help)
    for key, value in (("flag", flag), ("group", group), ("metavar", metavar), ("minimum", minimum),
                       ("maximum", maximum), ("above", above)):
        if value is not None:
            meta[key] = value
    if choices:
        meta["choices"] = choices if callable(choices) else list(choices)
    if aliases:
        meta["aliases"] = list(aliases)
    if positional:
        meta["positional"] = True
    if isinstance(default, list):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    if callable(default) and not isinstance(default, type(None)):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StepInfo:
    """Handed to the step callback after every step.

    ``loss`` is a device tensor, the mean over images (``None`` when the step had no objective);
    converting it with ``float()`` syncs the host, so callbacks should do that only when they log.
    ``decode()`` renders the current state as images ``[B,3,H,W]`` in ``[0,1]``; it costs a
    decoder pass, so call it only for frames you keep.
    """

    step: int
    total: int
    latents: Any
    decode: Callable[[], torch.Tensor]
    loss: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


# Return ``False`` to stop the run early (the current state is kept as the result).
StepCallback = Callable[[StepInfo], "bool | None"]


@dataclass
class GenerationResult:
    """Final images ``[B,3,H,W]`` in ``[0,1]`` (float32, on the CPU) and facts about the run (see the
    module docstring for the meaning of each field)."""

    images: torch.Tensor
    losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    steps_done: int = 0
    stopped_at: int | None = None


class Generator(ABC):
    """A backend: built once from its settings (loads models), then ``generate`` any number of times."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    presets: ClassVar[dict[str, Callable[[], dict[str, Any]]]] = {}
    #: True for a backend that has nothing to do without a steering objective (latent optimisers)
    needs_objective: ClassVar[bool] = False
    #: True for a backend whose runs can be checkpointed and resumed (those on the shared optimisation loop:
    #: they pass ``checkpoint=self.checkpoint``, set by the run session, to ``optimise``)
    resumable: ClassVar[bool] = False
    checkpoint: Any = None

    def __init__(self, settings: Any = None, *, device: str | torch.device | None = None,
                 precision: str | torch.dtype | None = None):
        from guidance import resolve_device, resolve_dtype

        self.settings = settings if settings is not None else self.settings_class()()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision, self.device)

    def compile_targets(self) -> list[torch.nn.Module]:
        """The modules of this backend's hot loop that ``--compile`` compiles (its decoder); none by default."""
        return []

    def grad_scaler(self):
        """fp16 loss scaling for a latent optimiser: a ``torch.amp.GradScaler`` in fp16, else ``None``."""
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)

    @abstractmethod
    def generate(self, objective, *, seed: int = 0, callback: StepCallback | None = None) -> GenerationResult:
        """Run one generation steered by *objective* (a ``guidance.Objective`` or ``None``)."""

    @classmethod
    def check(cls, settings: Any, device: torch.device | None = None) -> None:
        """Validate *settings* without loading any model (one-line ``ValueError``/``FileNotFoundError``);
        the run session calls it before the first model loads."""

    @classmethod
    def run_length(cls, settings: Any) -> int | None:
        """How many steps a run takes (``iterations`` or ``steps``), for warnings about story steps."""
        for name in ("iterations", "steps"):
            value = getattr(settings, name, None)
            if isinstance(value, int):
                return value
        return None

    @classmethod
    def settings_from(cls, options: dict[str, Any]) -> Any:
        """Build ``Settings`` from a dict, ignoring keys other backends own; unknown types are not coerced."""
        settings_cls = cls.settings_class()
        names = {f.name for f in fields(settings_cls)}
        return settings_cls(**{k: v for k, v in options.items() if k in names and v is not None})

    @classmethod
    def settings_class(cls) -> type:
        """The dataclass of this backend's options (``Settings``; a backend whose options grow with a registry,
        as the sd backend's with the guiders', returns it with those fields added)."""
        return cls.Settings


def field_choices(f) -> list | None:
    """A settings field's choices (from its registry now, where they are a function), or ``None``."""
    choices = f.metadata.get("choices")
    if not choices:
        return None
    return list(choices() if callable(choices) else choices)


def field_default(f) -> Any:
    """A dataclass field's default value (its factory called), or ``None``."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


__all__ = ["Generator", "GenerationResult", "StepInfo", "StepCallback", "option", "check_seed", "stream_seed",
           "seed_generator", "SEED_MAX", "field_default", "field_choices"]
