"""What a run prints besides its results: clipsteer's messages through :mod:`logging`, and the libraries' own.

The command line's ``-q`` / ``-v`` choose a :func:`verbosity`: by default clipsteer's warnings and its
progress bar show, while transformers', diffusers' and the Hub's progress bars ("Loading weights"),
their log messages below errors and the Python warnings raised inside them are hidden; ``-v`` shows
those too (``-vv`` adds clipsteer's debug messages); ``-q`` leaves errors only.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

LOGGER = logging.getLogger("clipsteer")
_THIRD_PARTY = ("site-packages", "dist-packages")


class quiet_libraries:
    """Within the block, hide transformers', diffusers' and the Hub's progress bars (*bars*) and their log
    messages below errors (*messages*); what was changed is restored on exit."""

    def __init__(self, *, bars: bool = True, messages: bool = False):
        self.bars, self.messages = bars, messages
        self.restore: list = []

    def __enter__(self):
        if not (self.bars or self.messages):
            return self
        import diffusers.utils.logging as diffusers_logging
        import huggingface_hub.utils as hub_utils
        import transformers.utils.logging as transformers_logging

        for module in (transformers_logging, diffusers_logging):
            if self.bars and module.is_progress_bar_enabled():
                module.disable_progress_bar()
                self.restore.append(module.enable_progress_bar)
            if self.messages and module.get_verbosity() < logging.ERROR:
                self.restore.append(lambda module=module, level=module.get_verbosity(): module.set_verbosity(level))
                module.set_verbosity_error()
        if self.bars and not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            self.restore.append(hub_utils.enable_progress_bars)
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.restore):
            undo()
        self.restore.clear()
        return False


class verbosity:
    """The command line's output for *level* (-1: ``-q``, 0: default, 1: ``-v``, 2: ``-vv``) within the block:
    the ``clipsteer`` logger's level and handler, Python warnings shown as ``warning: ...`` lines through it
    (those raised inside third-party packages only with ``-v``), and :class:`quiet_libraries` below ``-v``."""

    def __init__(self, level: int = 0):
        self.level = level
        self.libraries = quiet_libraries(bars=level < 1, messages=level < 1)

    def __enter__(self):
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))
        self.handler.addFilter(_lower_level_name)
        self.saved = (LOGGER.level, LOGGER.propagate, warnings.showwarning)
        LOGGER.addHandler(self.handler)
        LOGGER.setLevel({-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(self.level, logging.DEBUG))
        LOGGER.propagate = False
        warnings.showwarning = self._show_warning
        self.libraries.__enter__()
        return self

    def _show_warning(self, message, category, filename, lineno, file=None, line=None):
        third_party = any(part in _THIRD_PARTY for part in Path(str(filename)).parts)
        if third_party and self.level < 1:
            return
        LOGGER.warning("%s", message)

    def __exit__(self, *exc):
        self.libraries.__exit__(*exc)
        LOGGER.removeHandler(self.handler)
        LOGGER.setLevel(self.saved[0])
        LOGGER.propagate = self.saved[1]
        warnings.showwarning = self.saved[2]
        return False


def _lower_level_name(record: logging.LogRecord) -> bool:
    record.levelname_lower = record.levelname.lower()
    return True


__all__ = ["LOGGER", "quiet_libraries", "verbosity"]
