"""Helpers for clipsteer's one-line error messages (shared by every loader)."""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its class name when empty), cut to *limit* characters."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[:limit].rstrip() + "..."


def looks_like_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True when *name* is clearly a local path rather than an ``org/model`` Hub id."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or (bool(suffixes) and name.endswith(suffixes)))


def load_error(kind: str, name: str, err: BaseException) -> OSError:
    """A one-line ``OSError`` for a model that failed to load, naming it and the offline fix."""
    return OSError(f"could not load {kind} {name!r}: {first_line(err)}. If you are offline, download it first "
                   f"(`hf download {name}`) and pass the local folder")


__all__ = ["first_line", "looks_like_path", "load_error"]
