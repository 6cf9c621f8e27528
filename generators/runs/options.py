"""Options of a run: reflected from the settings dataclasses, coerced, read from config files, merged.

Every option is a field of :class:`generators.runs.settings.RunSettings` or of a backend's ``Settings``
(declared with :func:`generators.base.option`). :func:`option_specs` reflects them into
:class:`OptionSpec` objects, from which the command line, config files and the web UI are built;
:func:`resolve_options` merges defaults < preset < config file < explicit options, coercing and
checking each value once (types, finite numbers, ranges, choices).
"""

from __future__ import annotations

import difflib
import math
import typing
import warnings
from dataclasses import dataclass, fields, is_dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Mapping

from guidance.errors import first_line

from .. import DEFAULT_BACKEND, backend_names, get_generator_class
from ..base import field_choices, field_default
from .settings import GROUPS, RUN_NAMES, RunSettings


def _hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotation: fall back to the raw strings
        return {f.name: f.type for f in fields(cls)}


def field_kind(tp: Any) -> tuple[str, bool]:
    """(``"int"``/``"float"``/``"str"``/``"bool"``/``"list"``, optional?) for a settings field type."""
    if isinstance(tp, str):
        text = tp.replace(" ", "")
        optional = "None" in text.split("|") or text.startswith("Optional[")
        base = text.replace("|None", "").replace("None|", "").removeprefix("Optional[").rstrip("]")
        if base.startswith(("list", "List", "Sequence", "tuple")):
            return "list", optional
        return (base if base in ("int", "float", "str", "bool") else "str"), optional
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    optional = type(None) in args
    if origin in (list, tuple) or origin is typing.Sequence:
        return "list", optional
    if args and optional:
        rest = [a for a in args if a is not type(None)]
        return field_kind(rest[0])[0], True
    if tp in (int, float, str, bool):
        return tp.__name__, optional
    return "str", optional


@dataclass
class OptionSpec:
    """One option: its field, type and owners (``"run"`` and/or backend names).

    ``target`` is the settings field it fills; it differs from ``name`` only for a backend field
    whose name is taken by a run option (the SD backend's ``prompt`` becomes ``sd_prompt``).
    """

    name: str
    field: Any
    kind: str
    optional: bool
    owners: list[str]
    target: str = ""
    per_owner: dict[str, Any] = dataclass_field(default_factory=dict)

    def __post_init__(self):
        self.target = self.target or self.name

    @property
    def default(self) -> Any:
        return field_default(self.field)

    def default_for(self, owner: str) -> Any:
        return field_default(self.per_owner.get(owner, self.field))

    @property
    def choices(self) -> list | None:
        return field_choices(self.field)

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def names(self) -> list[str]:
        """Spellings accepted as config keys / keyword arguments (field name, flag, aliases)."""
        spellings = [self.name, self.flag, *self.field.metadata.get("aliases", [])]
        return list(dict.fromkeys(s.lstrip("-").replace("-", "_") for s in spellings))


def _specs_of(cls, owner: str, into: dict[str, OptionSpec]) -> None:
    hints = _hints(cls)
    for f in fields(cls):
        kind, optional = field_kind(hints.get(f.name, f.type))
        name = f.name
        if owner != "run" and name in RUN_NAMES:
            name = f"{owner}_{f.name}"  # a backend field that a run option's name hides
        if name in into:
            if owner not in into[name].owners:
                into[name].owners.append(owner)
                into[name].per_owner[owner] = f
        else:
            into[name] = OptionSpec(name, f, kind, optional, [owner], target=f.name, per_owner={owner: f})


def option_specs(backends: list[str] | None = None, *, errors: dict[str, str] | None = None) -> dict[str, OptionSpec]:
    """Every option of the run and of *backends* (default: all registered). Backends whose module
    fails to import are skipped; their error goes into *errors* when given."""
    specs: dict[str, OptionSpec] = {}
    _specs_of(RunSettings, "run", specs)
    for name in backends if backends is not None else backend_names():
        try:
            cls = get_generator_class(name)
        except Exception as err:  # a broken or missing backend module must not break the others
            if errors is not None:
                errors[name] = f"{err.__class__.__name__}: {first_line(err)}"
            continue
        if is_dataclass(getattr(cls, "Settings", None)):
            _specs_of(cls.settings_class(), name, specs)
    return specs


def option_groups(specs: Mapping[str, OptionSpec]) -> list[tuple[str, str, list[OptionSpec]]]:
    """*specs* as ``(title, description, specs)`` groups in ``--help`` order: the run's own groups
    (:data:`GROUPS`), the options several backends share, then each backend's own. The command line
    and the web UI's form are both laid out by it."""
    run = {name: (name, desc, []) for name, desc in GROUPS.items()}
    shared = ("shared backend options", "used by every backend that has them", [])
    own = {name: (f"{name} backend", f"options of --backend {name}", []) for name in backend_names()}
    for spec in specs.values():
        if "run" in spec.owners:
            run[spec.field.metadata.get("group", "output")][2].append(spec)
        elif len(spec.owners) > 1:
            shared[2].append(spec)
        elif spec.owners[0] in own:
            own[spec.owners[0]][2].append(spec)
    return [group for group in (*run.values(), shared, *own.values()) if group[2]]


def _check_range(spec: OptionSpec, value, where: str):
    """Numbers must be finite and inside the field's declared bounds."""
    meta = spec.field.metadata
    label = spec.flag
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"option {label}{where} is {value}; give a finite number")
    low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    if low is not None and value < low:
        raise ValueError(f"option {label}{where} is {value}; it must be at least {low}")
    if above is not None and value <= above:
        raise ValueError(f"option {label}{where} is {value}; it must be greater than {above}")
    if high is not None and value > high:
        raise ValueError(f"option {label}{where} is {value}; it must be at most {high}")
    return value


def coerce(spec: OptionSpec, value: Any, source: str = "") -> Any:
    """*value* converted to the option's type and checked (finite, in range), or a one-line ``ValueError``."""
    where = f" (from {source})" if source else ""
    label = spec.name
    if value is None:
        return None
    if spec.kind == "list":
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ValueError(f"option {label}{where} must be a list of strings; got {value!r}")
    if spec.optional and isinstance(value, str) and value.strip().lower() == "none" and spec.kind != "str":
        return None
    try:
        if spec.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if spec.kind == "int":
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) and "." in value else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            number = int(number)
        elif spec.kind == "float":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        else:
            meta = spec.field.metadata
            if isinstance(value, (dict, list)) and meta.get("mapping_ok"):      # story={0: "...", 100: "..."}
                return value
            if isinstance(value, (dict, list, tuple, bytes, bytearray)):
                raise ValueError
            if meta.get("text_only") and not isinstance(value, str):
                raise ValueError              # generate(5) or generate(b"a cat") is a mistake, not a prompt
            return str(value)
    except (TypeError, ValueError, OverflowError):
        kinds = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text (a str)"}
        raise ValueError(f"option {label}{where} must be {kinds.get(spec.kind, spec.kind)}; got {value!r}") from None
    return _check_range(spec, number, where)


def load_config(path: str | Path) -> dict[str, Any]:
    """Options from a YAML, TOML or JSON file (flat keys; tables named after a group or backend are merged)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a folder; give a YAML, TOML or JSON file of options")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; check the path given to --config")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ValueError("reading a TOML config needs Python 3.11+ or the tomli package "
                                 "(pip install tomli); or write the config as YAML") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    elif suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(text)          # JSON is YAML
        except yaml.YAMLError as err:
            first = first_line(err)
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    else:
        raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml, .toml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    flat: dict[str, Any] = {}
    sections = set(GROUPS) | set(backend_names())
    for key, value in data.items():
        if isinstance(value, dict) and str(key) in sections:
            flat.update(value)
        else:
            flat[str(key)] = value
    return flat


# diffusers' argument names, each accepted for the first of its options that the backend has
# (``num_inference_steps``: the sd backend's steps, the noise backend's render steps, the optimising
# backends' iterations; ``guidance_scale`` is the CFG scale, never --clip-guidance-scale).
DIFFUSERS_NAMES: dict[str, tuple[str, ...]] = {
    "num_inference_steps": ("steps", "render_steps", "iterations"),
    "guidance_scale": ("cfg_scale",),
    "num_images_per_prompt": ("num_images",),
    "negative_prompt": ("negative_prompt",),
}


def diffusers_target(name: str, specs: Mapping[str, OptionSpec]) -> str | None:
    """The option that diffusers' argument *name* means for the backend(s) of *specs* (None: none)."""
    return next((c for c in DIFFUSERS_NAMES.get(name, ()) if c in specs), None)


def seed_of_generator(generator: Any) -> int:
    """The seed of a diffusers-style ``generator=`` argument: a fresh CPU ``torch.Generator`` (or a list of
    one) gives its ``initial_seed()``; anything clipsteer cannot reproduce from a seed is a one-line error."""
    import torch

    fix = "pass seed=N (or generator=torch.Generator().manual_seed(N))"
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise ValueError(f"generator: a list of {len(generator)} generators cannot be honoured (clipsteer "
                             f"draws a batch from one seed); {fix}")
        generator = generator[0]
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator; got {type(generator).__name__}; {fix}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator on {generator.device} draws other numbers than clipsteer's CPU generator "
                         f"of the same seed; {fix}")
    seed = generator.initial_seed()
    if not torch.equal(generator.get_state(), torch.Generator().manual_seed(seed).get_state()):
        raise ValueError(f"generator has drawn numbers since it was seeded with {seed}; clipsteer starts from the "
                         f"seed itself, so {fix}")
    return seed


def _alias_map(specs: Mapping[str, OptionSpec]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs.values():
        for alias in spec.names:
            out.setdefault(alias, spec.name)
    for name in DIFFUSERS_NAMES:
        target = diffusers_target(name, specs)
        if target is not None:
            out.setdefault(name, target)
    out.setdefault("size", "size")
    return out


def _normalise(options: Mapping[str, Any], specs: Mapping[str, OptionSpec], source: str,
               strict: bool) -> dict[str, Any]:
    """Map spellings to option names, expand ``size``, coerce types; unknown keys raise when *strict*."""
    aliases = _alias_map(specs)
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in options.items():
        norm = str(key).strip().lstrip("-").replace("-", "_")
        name = aliases.get(norm)
        if name is not None and value is not None and spelled.setdefault(name, str(key)) != str(key):
            raise ValueError(f"option {name} is given twice (from {source}), as {spelled[name]!r} and {key!r}; "
                             "give it once")
        if name is None:
            if strict:
                close = difflib.get_close_matches(norm, list(aliases), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "; see scripts/generate.py --help"
                raise ValueError(f"unknown option {key!r} (from {source}){hint}")
            continue
        if value is None:  # None means "not given": the next source down (or the default) applies
            continue
        if name == "size":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"option size (from {source}) must be [WIDTH, HEIGHT]; got {value!r}")
            out["width"] = coerce(specs["width"], value[0], source) if "width" in specs else value[0]
            out["height"] = coerce(specs["height"], value[1], source) if "height" in specs else value[1]
            continue
        out[name] = coerce(specs[name], value, source)
    return out


def resolve_options(prompt: str | None = None, *, backend: str | None = None, preset: str | None = None,
                    config: str | Path | Mapping | None = None, **options) -> tuple[str, dict[str, Any], dict]:
    """Merge defaults < preset < config < keyword options. Returns (backend, options, provenance)."""
    from .presets import get_preset

    explicit = dict(options)
    if explicit.get("generator") is not None:            # diffusers' generator=: its seed
        seed = seed_of_generator(explicit.pop("generator"))
        if explicit.get("seed") is not None and explicit["seed"] != seed:
            raise ValueError(f"seed={explicit['seed']!r} and generator (seeded with {seed}) disagree; give one of them")
        explicit["seed"] = seed
    explicit.pop("generator", None)
    if prompt is not None:
        explicit["prompt"] = prompt
    if isinstance(config, Mapping):
        config_opts, config_source = dict(config), "config"
    elif config is not None:
        config_opts, config_source = load_config(config), str(config)
    else:
        config_opts, config_source = {}, "config"
    preset = preset or config_opts.pop("preset", None)
    config_opts.pop("preset", None)
    config_backend = config_opts.pop("backend", None)
    backend = backend or config_backend
    if backend is not None and backend not in backend_names():
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(backend_names())}")
    preset_opts = get_preset(preset, backend=backend or DEFAULT_BACKEND) if preset else {}
    backend = backend or preset_opts.pop("backend", None) or DEFAULT_BACKEND
    preset_opts.pop("backend", None)
    if backend not in backend_names():
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(backend_names())}")
    get_generator_class(backend)  # import errors of the chosen backend surface here
    own = option_specs([backend])
    every = None

    def normalise(opts: Mapping[str, Any], source: str, strict: bool, warn: bool) -> dict[str, Any]:
        nonlocal every
        known = _normalise(opts, own, source, strict=False)
        aliases = _alias_map(own)
        rest = {k: v for k, v in opts.items()
                if str(k).strip().lstrip("-").replace("-", "_") not in aliases}
        if rest and (strict or warn):  # other backends' options: checked, then left out
            every = every if every is not None else option_specs()
            others = _normalise(rest, every, source, strict=strict)
            if warn and others:
                owners = {k: "/".join(every[k].owners) if k in every else "?" for k in others}
                warnings.warn(f"ignoring option(s) {', '.join(f'{k} ({v} backend)' for k, v in owners.items())} "
                              f"with --backend {backend}", stacklevel=3)
        return known

    merged: dict[str, Any] = {name: spec.default_for(backend) for name, spec in own.items()}
    provenance: dict[str, str] = {name: "default" for name in own}
    for opts, source, strict, warn in ((preset_opts, f"preset {preset}", False, False),
                                       (config_opts, config_source, True, False),
                                       (explicit, "arguments", True, True)):
        for key, value in normalise(opts, source, strict, warn).items():
            merged[key] = value
            provenance[key] = source
    return backend, merged, {"sources": provenance, "preset": preset,
                             "config": None if isinstance(config, Mapping) else (str(config) if config else None)}



def backend_settings(backend: str, opts: Mapping[str, Any]):
    """The backend's ``Settings`` from merged options (only the fields it owns; never the run's own
    options, even where a backend field has the same name)."""
    cls = get_generator_class(backend)
    specs = option_specs([backend])
    values = {spec.target: opts[name] for name, spec in specs.items()
              if backend in spec.owners and name in opts and opts[name] is not None}
    return cls.settings_from(values)


__all__ = ["OptionSpec", "option_specs", "option_groups", "field_kind", "coerce", "load_config", "resolve_options",
           "backend_settings", "DIFFUSERS_NAMES", "diffusers_target", "seed_of_generator"]
