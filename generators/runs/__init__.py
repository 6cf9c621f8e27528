"""The Python API behind ``scripts/generate.py``: options in, a saved run out.

>>> from generators.runs import generate                                  # doctest: +SKIP
>>> run = generate("a red fox", backend="vqgan", preset="toy", seed=3, iterations=50)
>>> run.image.show(); run.path, run.clip_score

This module gathers the public names; the work is done in :mod:`generators.runs.session` (prepare ->
execute -> record), :mod:`generators.runs.options` (option reflection, coercion, config files,
precedence), :mod:`generators.runs.settings` (the run's own options) and :mod:`guidance.build`
(objective and scores from options).
"""

from __future__ import annotations

from guidance.build import (DEFAULT_CLIP, DEFAULT_EVAL, DEFAULT_EVAL_ALT, NONE_WORDS, build_objective,
                            build_schedule, eval_model_for, load_encoders, score_images)
from guidance.cache import clear_caches

from .options import OptionSpec, backend_settings, coerce, field_kind, load_config, option_specs, resolve_options
from .session import Run, generate
from .settings import GROUPS, RunSettings

__all__ = ["generate", "Run", "RunSettings", "resolve_options", "option_specs", "load_config", "build_schedule",
           "build_objective", "eval_model_for", "score_images", "load_encoders", "clear_caches", "GROUPS",
           "OptionSpec", "backend_settings", "coerce", "field_kind", "DEFAULT_CLIP", "DEFAULT_EVAL",
           "DEFAULT_EVAL_ALT", "NONE_WORDS"]
