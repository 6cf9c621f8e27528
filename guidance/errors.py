"""Helpers for clipsteer's one-line error messages (shared by every loader)."""

from __future__ import annotations

from contextlib import contextmanager

#: what a user's input can raise (a bad option, a missing or unreadable file or model, a missing package): the
#: command line and the web UI show these as one-line errors; anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, ImportError, OSError)


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


def unreadable_weights(kind: str, name: str, err: BaseException) -> Exception | None:
    """The one-line error for weights that cannot be read safely, or ``None`` for any other failure:
    a pickle that holds more than tensors (refused by ``torch.load(weights_only=True)``: loading it could
    run code) or a truncated / corrupt safetensors file."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return ValueError(f"{kind} {name!r}: its weights are a pickle that holds more than tensors, refused because "
                          "loading it could run code; use a .safetensors copy of the model (its Hub page usually has "
                          "one, or convert it once on a machine where you trust the file)")
    if type(err).__name__ == "SafetensorError":
        return OSError(f"{kind} {name!r} has a truncated or corrupt safetensors file ({first_line(err, 100)}); "
                       "download it again (or copy it whole)")
    return None


@contextmanager
def readable_weights(kind: str, name: str):
    """Turn :func:`unreadable_weights` failures inside the block into their one-line errors."""
    try:
        yield
    except Exception as err:
        mapped = unreadable_weights(kind, name, err)
        if mapped is None:
            raise
        raise mapped from None


__all__ = ["first_line", "looks_like_path", "load_error", "readable_weights", "unreadable_weights"]
