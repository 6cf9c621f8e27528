"""The web UI's form <-> ``generate()`` options, built from the same option metadata as the command line.

Every field of :class:`generators.runs.settings.RunSettings` and of each backend's ``Settings`` (declared
with :func:`generators.base.option`) becomes one :class:`FormField`, grouped as ``--help`` groups them
(:func:`generators.runs.options.option_groups`); ``backend``, ``preset`` and ``config`` come first, as on
the command line. A new backend option therefore appears in the form with no UI edit.

The form shows the merged defaults of the chosen backend and preset (:func:`form_values`); a run
started from it passes on only the fields that differ from those (:func:`run_options`), so the run
records the same settings and the same option sources as ``scripts/generate.py`` given those options.
Nothing here imports gradio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generators import DEFAULT_BACKEND, backend_names
from generators.runs.options import (
    DIFFUSERS_NAMES,
    OptionSpec,
    coerce,
    option_groups,
    option_specs,
    resolve_options,
)
from generators.runs.presets import DESCRIPTIONS, preset_names
from generators.runs.record import RunRecord, read_back

NONE = NO_PRESET = "none"
RUN_GROUP = ("run", "backend, preset and config file")
#: command-line options with no form field: a batch (--prompts-file and its companions) is a command-line
#: workflow, and --resume is the gallery's Resume button; -q/-v are the terminal's, and diffusers' names
#: (--num-inference-steps...) are spellings of fields the form has
CLI_ONLY = ("prompts_file", "seeds", "export", "export_dir", "resume", "from_", "quiet", "verbose",
            *(name for name, targets in DIFFUSERS_NAMES.items() if name not in targets))
#: option fields whose value a change of backend or preset keeps (what to draw, not how)
KEPT_ON_SWITCH = frozenset({"prompt", "story", "image_prompts", "noise_prompts", "seed", "out"})


@dataclass
class FormField:
    """One form field: ``name`` is the ``generate()`` keyword it fills.

    ``widget`` is ``"choice"`` (``choices``), ``"bool"``, ``"number"`` / ``"int"`` (a number box),
    ``"text"`` or ``"lines"`` (a list option: one value per line).
    """

    name: str
    label: str
    widget: str
    group: str
    help: str = ""
    choices: list[str] | None = None
    owners: tuple[str, ...] = ("run",)
    spec: OptionSpec | None = None

    @property
    def optional(self) -> bool:
        return self.spec is not None and self.spec.optional


def _widget(spec: OptionSpec) -> str:
    if spec.kind == "bool":
        return "bool"
    if spec.choices:
        return "choice"
    if spec.kind == "list":
        return "lines"
    if spec.kind in ("int", "float"):
        if spec.optional:
            return "text"      # a number box cannot stay empty (unset), and a 64-bit seed must stay exact
        return "int" if spec.kind == "int" else "number"
    return "text"


def _field(spec: OptionSpec, group: str) -> FormField:
    meta = spec.field.metadata
    label = spec.flag.lstrip("-")
    choices = spec.choices
    if choices and spec.optional and NONE not in choices:
        choices.insert(0, NONE)            # as on the command line: 'none' leaves it unset
    return FormField(name=spec.name, label=label, widget=_widget(spec), group=group, help=str(meta.get("help", "")),
                     choices=choices, owners=tuple(spec.owners), spec=spec)


def form_groups() -> list[tuple[str, str, list[FormField]]]:
    """``(title, description, fields)`` in the order of ``scripts/generate.py --help``."""
    presets = "; ".join(f"{n}: {DESCRIPTIONS.get(n, '')}" for n in preset_names())
    first = [
        FormField("backend", "backend", "choice", RUN_GROUP[0], "generator backend", choices=backend_names()),
        FormField("preset", "preset", "choice", RUN_GROUP[0], f"named option defaults ({presets})",
                  choices=[NO_PRESET, *preset_names()]),
        FormField("config", "config", "text", RUN_GROUP[0],
                  "YAML, TOML or JSON file of options on the server (from a folder it allows); its options fill the form"),
    ]
    groups = [(RUN_GROUP[0], RUN_GROUP[1], first)]
    for title, description, specs in option_groups(option_specs()):
        groups.append((title, description, [_field(spec, title) for spec in specs]))
    return groups


def form_fields() -> list[FormField]:
    """Every field of the form, in order."""
    return [f for _, _, fields in form_groups() for f in fields]


def to_widget(field: FormField, value: Any) -> Any:
    """An option value as its widget shows it (lists one per line, ``None`` as an empty box)."""
    if field.widget == "lines":
        return "\n".join(map(str, value or []))
    if field.widget == "bool":
        return bool(value)
    if field.widget in ("int", "number"):
        return value
    if value is None:
        return NONE if field.widget == "choice" else ""
    if isinstance(value, Mapping):          # a story given as {step: prompts}
        return "; ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def from_widget(field: FormField, value: Any) -> Any:
    """A widget's value as a ``generate()`` keyword value (not yet checked: ``generate`` does that)."""
    if field.widget == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if field.widget in ("int", "number"):
        if value is None or value == "":
            return None
        if field.widget == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if field.widget == "choice" and field.optional and value in (None, NONE):
        return None
    if field.widget == "text":
        text = "" if value is None else str(value)
        if not text.strip() and (field.spec is None or field.optional):
            return None
        return text
    return value


def _choice(value: Any) -> str | None:
    return None if value in (None, "", NO_PRESET) else str(value)


def defaults(backend: str | None = None, preset: str | None = None, config: str | None = None) -> dict[str, Any]:
    """The merged options (defaults < preset < config file) of *backend*, as ``generate`` would start from."""
    _, merged, _ = resolve_options(None, backend=backend or DEFAULT_BACKEND, preset=preset, config=config or None)
    return merged


def form_values(backend: str | None = None, preset: str | None = None, config: str | None = None,
                settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Widget values of every field for *backend* and *preset* (and *config*); *settings* (a run's
    ``run.json`` settings) override them. Fields of other backends show those backends' defaults."""
    backend = backend or DEFAULT_BACKEND
    merged = defaults(backend, preset, config)
    values: dict[str, Any] = {"backend": backend, "preset": preset or NO_PRESET, "config": config or ""}
    for field in form_fields():
        if field.spec is None:
            continue
        if settings is not None and field.name in settings:
            value = settings[field.name]
        elif field.name in merged:
            value = merged[field.name]
        else:
            value = field.spec.default_for(field.owners[0])
        values[field.name] = to_widget(field, value)
    return values


def values_from_run(record: RunRecord | Mapping[str, Any], folder: str | Path | None = None) -> dict[str, Any]:
    """Widget values that start the run recorded in *record* (its ``run.json``, :meth:`RunRecord.read`, of run
    *folder*; its content as a mapping is read with :meth:`RunRecord.from_dict`) again: its backend, preset
    and every setting it ran with (those that came from a config file included; paths recorded relative to
    the run folder resolved against *folder*; a preset's models from the preset)."""
    if not isinstance(record, RunRecord):
        record = RunRecord.from_dict(record)
    sources = record.option_sources if isinstance(record.option_sources, Mapping) else {}
    settings = read_back(record.settings or {}, sources, folder)
    return form_values(record.backend, record.preset, None, settings)


def values_from_file(path: str | Path) -> dict[str, Any]:
    """Widget values from a PNG (clipsteer's or AUTOMATIC1111's) or a run.json, as ``--from`` reads it
    (:func:`generators.runs.replay.replay_config`): its backend, preset and the settings it records."""
    from generators.runs.options import resolve_options
    from generators.runs.replay import replay_config

    config = replay_config(path)
    config.pop("seeds", None)
    backend, opts, provenance = resolve_options(config=config)
    settings = {k: v for k, v in opts.items() if provenance["sources"].get(k) == "config"}
    return form_values(backend, provenance["preset"], None, settings)


def run_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``generate()`` keyword arguments from widget values: backend, preset, config and every option
    of the run or of the chosen backend whose value differs from the merged defaults."""
    backend = _choice(values.get("backend")) or DEFAULT_BACKEND
    preset = _choice(values.get("preset"))
    config = from_widget(form_fields()[2], values.get("config"))
    merged = defaults(backend, preset, config)
    options: dict[str, Any] = {"backend": backend}
    if preset:
        options["preset"] = preset
    if config:
        options["config"] = config
    for field in form_fields():
        if field.spec is None or field.name not in values or not ({"run", backend} & set(field.owners)):
            continue
        value = from_widget(field, values[field.name])
        if value is None:                # an empty box: unset, spelled as on the command line (--grad-clip none)
            if merged.get(field.name) is not None and field.spec.kind in ("int", "float"):
                options[field.name] = "none"
            continue
        try:
            value = coerce(field.spec, value)
        except ValueError:
            options[field.name] = value  # passed on as given: generate() reports it as the CLI does
            continue
        if value != merged.get(field.name):
            options[field.name] = value
    return options


def shown(backend: str) -> tuple[set[str], set[str]]:
    """(fields, groups) the form shows for *backend*: the run's own and those *backend* has."""
    names, titles = set(), set()
    for title, _, fields in form_groups():
        for field in fields:
            if field.spec is None or "run" in field.owners or backend in field.owners:
                names.add(field.name)
                titles.add(title)
    return names, titles


__all__ = [
    "CLI_ONLY",
    "KEPT_ON_SWITCH",
    "NO_PRESET",
    "FormField",
    "defaults",
    "form_fields",
    "form_groups",
    "form_values",
    "from_widget",
    "run_options",
    "shown",
    "to_widget",
    "values_from_run",
]
