"""One registry of loaded models, kept across runs: least recently used first out, one place to clear.

Every loader that keeps models between runs (CLIP encoders, VQGANs, diffusion pipelines, reward
models) stores them here under a *kind* with its own capacity, so ``clear_caches()`` frees all of
them at once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

DEFAULT_SIZES = {"encoder": 4, "score": 2, "vqgan": 2, "pipeline": 1, "reward": 4}


class ModelCache:
    """``get(kind, key, load)`` returns the cached value or calls ``load()`` and keeps its result."""

    def __init__(self, sizes: dict[str, int] | None = None):
        self.sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
        self._stores: dict[str, OrderedDict[Hashable, Any]] = {}

    def get(self, kind: str, key: Hashable, load: Callable[[], Any]) -> Any:
        store = self._stores.setdefault(kind, OrderedDict())
        if key in store:
            store.move_to_end(key)
            return store[key]
        value = load()
        capacity = max(1, int(self.sizes.get(kind, 1)))
        while len(store) >= capacity:
            store.popitem(last=False)
        store[key] = value
        return value

    def keys(self, kind: str) -> list[Hashable]:
        return list(self._stores.get(kind, {}))

    def clear(self, kind: str | None = None) -> None:
        if kind is None:
            self._stores.clear()
        else:
            self._stores.pop(kind, None)


MODELS = ModelCache()


def cached(kind: str, key: Hashable, load: Callable[[], Any]) -> Any:
    """The model stored under (*kind*, *key*), loading it with *load* the first time."""
    return MODELS.get(kind, key, load)


def clear_caches(kind: str | None = None) -> None:
    """Forget cached models (all kinds, or one), freeing their memory."""
    MODELS.clear(kind)


__all__ = ["ModelCache", "MODELS", "cached", "clear_caches"]
