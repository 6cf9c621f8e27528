"""Guiders: how an objective corrects a diffusion model's output inside the sampling loop, and their registry.

One file per rule: ``clip`` (:mod:`.clip`, the community pipeline's rule), ``dps`` and ``freedom``
(:mod:`.dps`), ``mpgd`` (:mod:`.mpgd`), ``ugd`` (:mod:`.ugd`), ``tfg`` (:mod:`.tfg`); what they share is in
:mod:`.base`, their default settings per profile in :mod:`.defaults`. Each guider owns its options: a
dataclass of ``option(...)`` fields (its ``Options``) and :meth:`~.base.Guider.settings_kwargs`, which reads
them back from the run's settings. A new guider is one file (a :class:`~.base.Guider` subclass, with its
``Options`` if it has any) plus ``register_guider("name", Class)``; the ``--guider`` choices, its options'
flags, config keys and web-form fields are read from this registry when the command line and the web form
are built.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch

from ..tables import clean_estimate
from .base import (HALF_LOSS_SCALE, PREDICTIONS, SCHEDULES, SMOOTHING_SCHEDULES, STEP_RULES, Denoiser, GuidedStep,
                   Guider, GuiderOptions, fold_clean_change, guided_steps, schedule_weights, smoothed_loss)
from .clip import CLIPGuider, CLIPOptions
from .dps import DPSGuider, DPSOptions, FreeDoMGuider
from .mpgd import MPGDGuider
from .tfg import SmoothingOptions, TFGGuider
from .ugd import BackwardOptions, UGDGuider

GUIDERS: dict[str, type[Guider]] = {"none": Guider, "clip": CLIPGuider, "dps": DPSGuider, "mpgd": MPGDGuider,
                                    "freedom": FreeDoMGuider, "ugd": UGDGuider, "tfg": TFGGuider}


@dataclasses.dataclass
class GuiderSettings(SmoothingOptions, BackwardOptions, DPSOptions, CLIPOptions, GuiderOptions):
    """The options of the built-in guiders together (part of the sd backend's ``Settings``)."""


def register_guider(name: str, cls: type[Guider]) -> None:
    """Make guider *cls* selectable as ``--guider name`` (its ``Options`` become options of the sd backend)."""
    GUIDERS[name] = cls


def guider_names() -> list[str]:
    """The registered guiders' names, sorted (the ``--guider`` choices)."""
    return sorted(GUIDERS)


def option_classes() -> list[type]:
    """The ``Options`` dataclasses of every registered guider (each class of their MROs that declares one)."""
    found: list[type] = []
    for guider in GUIDERS.values():
        for klass in guider.__mro__:
            options = vars(klass).get("Options")
            if options is not None and dataclasses.is_dataclass(options) and options not in found:
                found.append(options)
    return found


_WITH_OPTIONS: dict[tuple, type] = {}


def with_guider_options(settings_cls: type) -> type:
    """*settings_cls*, or a dataclass subclass of it with the fields of registered guiders' options it lacks."""
    have = {f.name for f in dataclasses.fields(settings_cls)}
    extra = [f for options in option_classes() for f in dataclasses.fields(options) if f.name not in have]
    if not extra:
        return settings_cls
    key = (settings_cls, tuple(f.name for f in extra))
    if key not in _WITH_OPTIONS:
        _WITH_OPTIONS[key] = dataclasses.make_dataclass(
            settings_cls.__name__, [(f.name, f.type, f) for f in extra], bases=(settings_cls,),
            namespace={"__module__": settings_cls.__module__, "__doc__": settings_cls.__doc__})
    return _WITH_OPTIONS[key]


def check_guider(name: str) -> type[Guider]:
    if name not in GUIDERS:
        raise ValueError(f"unknown guider {name!r}; choose from {', '.join(guider_names())}")
    return GUIDERS[name]


def make_guider(name: str, objective, **kwargs) -> Guider:
    """Guider *name* with its keyword arguments; a one-line error for an unknown name."""
    return check_guider(name)(objective, **kwargs)


def guider_from_settings(name: str, objective, settings) -> Guider:
    """Guider *name* with its options read from a run's *settings* (:meth:`~.base.Guider.from_settings`)."""
    return check_guider(name).from_settings(objective, settings)


def guided_scheduler_step(guider: Guider, step: GuidedStep, scheduler, sample: torch.Tensor, timestep, *,
                          to_scheduler: Callable[[torch.Tensor], torch.Tensor] | None = None, **step_kwargs):
    """One step of the sampling loop: ``guider.model_output`` -> ``scheduler.step`` (the output first converted by
    *to_scheduler*: rectified flow's velocity) -> ``guider.sample_correction``. Returns ``(sample, clean
    estimate of the corrected output, LossOutput or None)``."""
    out, loss = guider.model_output(step)
    x0 = clean_estimate(step.z, out, step.alpha_bar, step.prediction_type)
    if to_scheduler is not None:
        out = to_scheduler(out)
    sample = scheduler.step(out, timestep, sample, **step_kwargs, return_dict=False)[0]
    return guider.sample_correction(step, sample), x0, loss


def setup_guider(guider: Guider, num_steps: int, tables) -> None:
    """``guider.setup(num_steps, tables)``; a user's guider whose ``setup`` takes only the step count still works."""
    params = [p for p in inspect.signature(guider.setup).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        guider.setup(num_steps, tables)
    else:
        guider.setup(num_steps)


__all__ = ["Guider", "CLIPGuider", "DPSGuider", "MPGDGuider", "FreeDoMGuider", "UGDGuider", "TFGGuider",
           "GuidedStep", "Denoiser", "GUIDERS", "GuiderSettings", "register_guider", "guider_names", "make_guider",
           "guider_from_settings", "option_classes", "with_guider_options", "guided_steps", "setup_guider",
           "guided_scheduler_step", "SCHEDULES", "SMOOTHING_SCHEDULES", "PREDICTIONS", "STEP_RULES",
           "schedule_weights", "smoothed_loss", "fold_clean_change", "HALF_LOSS_SCALE"]
