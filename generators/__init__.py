"""Generator backends steered by a ``guidance.Objective``, and their registry.

``get_generator("vqgan", settings, device=...)`` imports a backend only when asked, so
importing this package stays cheap. Add a backend with :func:`register`.
"""

from __future__ import annotations

import importlib

from .base import GenerationResult, Generator, StepCallback, StepInfo

# The one place that names the built-in backends.
_REGISTRY: dict[str, str | type] = {
    "vqgan": "generators.vqgan.backend:VQGANGenerator",
    "sd": "generators.diffusion.sampling:StableDiffusionGenerator",
    "pixels": "generators.pixels:PixelsGenerator",
    "noise": "generators.diffusion.noise:NoiseGenerator",
}
DEFAULT_BACKEND = "vqgan"


def register(name: str, target: str | type[Generator]) -> None:
    """Register a backend class (or ``"module:Class"`` path) under *name*."""
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_generator_class(name: str) -> type[Generator]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(backend_names())}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
    return target


def get_generator(name: str, settings=None, **kwargs) -> Generator:
    """Instantiate backend *name* with its ``Settings`` (or a dict of them)."""
    cls = get_generator_class(name)
    if isinstance(settings, dict):
        settings = cls.settings_from(settings)
    return cls(settings, **kwargs)


__all__ = ["Generator", "GenerationResult", "StepInfo", "StepCallback", "register", "backend_names", "DEFAULT_BACKEND",
           "get_generator", "get_generator_class"]
