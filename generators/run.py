"""The Python API behind ``scripts/generate.py``: options in, a saved run out.

>>> from generators.run import generate                                  # doctest: +SKIP
>>> run = generate("a red fox", backend="vqgan", preset="toy", seed=3, iterations=50)
>>> run.image.show(); run.path, run.clip_score

:func:`generate` merges option defaults, a preset, a config file and keyword arguments (in
that order of precedence), builds a ``guidance.CLIPLoss`` from the prompt options, builds
the backend from its ``Settings``, runs it with a progress bar, scores the result with an
evaluation CLIP and writes a new run folder (see :mod:`generators.outputs`). Ctrl-C during
the run keeps the current image: it is saved, marked ``interrupted``.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import math
import platform
import secrets
import sys
import time
import typing
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from . import backend_names, get_generator_class
from .base import GenerationResult, StepInfo

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_EVAL = "openai/clip-vit-large-patch14"
DEFAULT_EVAL_ALT = "openai/clip-vit-base-patch16"  # when the large one guided
NONE_WORDS = ("none", "off", "no", "false", "")

# Option groups, in --help order.
GROUPS = {
    "prompts": "what to draw: text, image and noise prompts, schedules",
    "guidance": "how CLIP steers: models, cutouts, augmentations, extra image losses",
    "output": "seed, run folder, frames, animation, evaluation",
    "runtime": "device and precision",
}


def _opt(default, help: str, group: str, **meta):
    meta.update(help=help, group=group)
    if callable(default):  # a factory (list, lambda) for mutable defaults
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunSettings:
    """Options shared by every backend (each becomes a CLI option and a config-file key)."""

    # prompts
    prompt: str | None = _opt(None, "text prompt(s): 'a lighthouse at dusk:1|fog:0.5|blurry:-1' "
                                    "(TEXT[:WEIGHT[:STOP]], '|'-separated; negative weights push away)",
                              "prompts", positional=True)
    story: str | None = _opt(None, "prompt schedule ('story mode'): '0=a forest; 100=a city|night:0.5' "
                                   "switches prompts at those steps", "prompts", metavar="SCHEDULE")
    image_prompts: list[str] = _opt(list, "image prompt PATH[:WEIGHT] (repeatable)", "prompts",
                                    flag="--image-prompt", metavar="PATH[:W]")
    noise_prompts: list[str] = _opt(list, "noise prompt SEED[:WEIGHT]: a random CLIP target (repeatable)",
                                    "prompts", flag="--noise-prompt", metavar="SEED[:W]")
    # guidance
    clip: list[str] = _opt(lambda: [DEFAULT_CLIP], "guiding CLIP: Hub id, local folder or "
                           "open_clip:ARCH/PRETRAINED; MODEL=WEIGHT to weight it; repeat for an ensemble; "
                           "'none' for no CLIP guidance", "guidance", metavar="MODEL[=W]")
    cutouts: int = _opt(32, "cutouts per image per step", "guidance", metavar="N")
    cut_pow: float = _opt(1.0, "cutout size exponent (>1 favours small cutouts)", "guidance")
    overview: int = _opt(0, "how many of the cutouts show the whole image", "guidance", metavar="N")
    min_fraction: float | None = _opt(None, "smallest cutout side as a fraction of the image (default: "
                                            "CLIP's input size)", "guidance")
    augmentations: list[str] = _opt(lambda: ["Af", "Pe", "Ji", "Er"], "cutout augmentations, names or "
                                    "short names with optional probability ('Af Pe Ji Er', 'jitter:0.3'); "
                                    "'none' for none", "guidance", flag="--augment", metavar="AUG")
    distance: str = _opt("spherical", "embedding distance", "guidance", choices=["spherical", "cosine"])
    tv_weight: float = _opt(0.0, "total-variation loss weight (smoother images)", "guidance")
    range_weight: float = _opt(0.0, "weight of a penalty on pixels outside [0, 1]", "guidance")
    saturation_weight: float = _opt(0.0, "saturation loss weight (positive desaturates, negative "
                                         "saturates)", "guidance")
    symmetry_weight: float = _opt(0.0, "left-right symmetry loss weight", "guidance")
    # output
    seed: int | None = _opt(None, "random seed (default: a fresh one, recorded in the metadata)", "output",
                            metavar="N")
    out: str = _opt("outputs", "folder in which each run gets a new sub-folder", "output", metavar="DIR")
    save_every: int = _opt(0, "keep a frame every N steps (frames/ in the run folder); 0: none", "output",
                           metavar="N")
    animation: str = _opt("none", "animation of the frames: none, gif, mp4 or both", "output",
                          choices=["none", "gif", "mp4", "both"])
    fps: float = _opt(10.0, "animation frames per second", "output")
    eval_model: str = _opt("auto", "CLIP that scores the final image: a model name or folder, 'auto' (a "
                                   "different CLIP from the guiding one) or 'none'", "output", metavar="MODEL")
    progress: bool = _opt(True, "show a progress bar", "output")
    # runtime
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps", "runtime")
    precision: str = _opt("auto", "fp32, bf16 or fp16 (fp16 on GPUs only); auto is fp32", "runtime")
    threads: int | None = _opt(None, "CPU threads torch may use (default: torch's own choice); 1 is fastest for "
                                     "tiny models on a busy machine", "runtime", metavar="N")


_RUN_NAMES: set[str] = {f.name for f in fields(RunSettings)}


@dataclass
class Run:
    """What :func:`generate` returns: the images, where they were saved and what produced them.

    ``path`` is the run folder (``None`` with ``save=False``); ``image_paths`` the PNGs in it.
    """

    images: torch.Tensor
    metadata: dict[str, Any]
    path: Path | None = None
    image_paths: list[Path] = field(default_factory=list)
    clip_score: float | None = None
    interrupted: bool = False
    frames: list = field(default_factory=list, repr=False)

    @property
    def pil_images(self) -> list:
        from .outputs import to_pil

        return to_pil(self.images)

    @property
    def image(self):
        """The (first) final image as a PIL image."""
        return self.pil_images[0]

    @property
    def image_path(self) -> Path | None:
        return self.image_paths[0] if self.image_paths else None

    @property
    def seed(self) -> int:
        return self.metadata["seed"]

    @property
    def losses(self) -> list[float]:
        return self.metadata.get("losses", [])


# ---------------------------------------------------------------------------------------------
# Options: fields, types, merging
# ---------------------------------------------------------------------------------------------

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
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return None

    def default_for(self, owner: str) -> Any:
        f = self.per_owner.get(owner, self.field)
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            return f.default_factory()
        return None

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
        if owner != "run" and name in _RUN_NAMES:
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
                errors[name] = f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            continue
        if is_dataclass(getattr(cls, "Settings", None)):
            _specs_of(cls.Settings, name, specs)
    return specs


def coerce(spec: OptionSpec, value: Any, source: str = "") -> Any:
    """*value* converted to the option's type, or a one-line ``ValueError``."""
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
            return int(number)
        if spec.kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)) and spec.name == "story":
            return value
        if isinstance(value, (dict, list, tuple)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        kinds = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string"}
        raise ValueError(f"option {label}{where} must be {kinds.get(spec.kind, spec.kind)}; got {value!r}") from None


def load_config(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or TOML file (flat keys; tables named after a group or backend are merged)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; check the path given to --config")
    suffix = path.suffix.lower()
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
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    elif suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0] if str(err) else err.__class__.__name__
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    else:
        raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml or .toml")
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


def _alias_map(specs: Mapping[str, OptionSpec]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs.values():
        for alias in spec.names:
            out.setdefault(alias, spec.name)
    out.setdefault("size", "size")
    return out


def _normalise(options: Mapping[str, Any], specs: Mapping[str, OptionSpec], source: str,
               strict: bool) -> dict[str, Any]:
    """Map spellings to option names, expand ``size``, coerce types; unknown keys raise when *strict*."""
    aliases = _alias_map(specs)
    out: dict[str, Any] = {}
    for key, value in options.items():
        norm = str(key).strip().lstrip("-").replace("-", "_")
        name = aliases.get(norm)
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
    preset_opts = get_preset(preset, backend=backend or "vqgan") if preset else {}
    backend = backend or preset_opts.pop("backend", None) or "vqgan"
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


# ---------------------------------------------------------------------------------------------
# Building the guidance
# ---------------------------------------------------------------------------------------------

def _story_entries(story) -> dict[int, list]:
    """``"0=a forest; 100=a city|night:0.5"`` or ``{0: "a forest", 100: "a city"}`` -> {step: prompts}."""
    from guidance import parse_prompts

    if isinstance(story, Mapping):
        try:
            return {int(k): parse_prompts(v) for k, v in story.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"story must map steps to prompts, e.g. {{0: 'a forest', 100: 'a city'}}: {err}") from None
    entries: dict[int, list] = {}
    for part in (p for p in str(story).split(";") if p.strip()):
        step, sep, rest = part.partition("=")
        if not (sep and step.strip().isdigit()):
            raise ValueError(f"story entry {part.strip()!r} needs a step: write 'STEP=prompts', "
                             "e.g. '0=a forest; 100=a city'")
        entries[int(step)] = parse_prompts(rest)
    return entries


def build_schedule(opts: Mapping[str, Any]):
    """The ``PromptSchedule`` of text/image/noise prompts and the story, or ``None`` without prompts.

    The prompt is the step-0 entry of the story (so ``prompt`` + ``story="100=a city"`` works);
    image and noise prompts apply at every step.
    """
    from guidance import PromptSchedule, image_prompts, parse_prompts

    extra = image_prompts(opts.get("image_prompts") or [])
    extra += parse_prompts(list(opts.get("noise_prompts") or []), kind="noise")
    prompt, story = opts.get("prompt"), opts.get("story")
    entries = _story_entries(story) if story else {}
    if prompt:
        if 0 in entries:
            raise ValueError("both a prompt and a story entry for step 0 were given; drop one of them "
                             "(the prompt is the story's step 0)")
        entries[0] = parse_prompts(prompt)
    if not entries:
        entries = {0: []}
    elif 0 not in entries:
        raise ValueError(f"the story starts at step {min(entries)}; give the first prompt (positional) or "
                         "a '0=...' entry")
    entries = {step: list(prompts) + extra for step, prompts in sorted(entries.items())}
    if not any(entries.values()):
        return None
    for step, prompts in entries.items():
        if not prompts:
            raise ValueError(f"story step {step} has no prompts")
    return PromptSchedule(entries)


def _clip_specs(opts: Mapping[str, Any]) -> list[tuple[str, float]]:
    from guidance import parse_encoder_spec

    specs = [s for s in (opts.get("clip") or []) if s is not None]
    if any(str(s).strip().lower() in NONE_WORDS for s in specs):
        return []
    return [parse_encoder_spec(str(s).strip()) for s in specs]


def _augmentations(opts: Mapping[str, Any]) -> list[str]:
    items: list[str] = []
    for entry in opts.get("augmentations") or []:
        items += str(entry).replace(",", " ").split()
    if any(i.lower() in NONE_WORDS for i in items):
        return []
    return items


_ENCODERS: dict[tuple, Any] = {}
_ENCODER_CACHE_SIZE = 3


def load_encoders(names: list[str], *, device, precision) -> list:
    """CLIP encoders by name, loaded once per (name, device, precision) and reused across runs."""
    from guidance import load_encoder

    out = []
    for name in names:
        key = (name, str(device), str(precision))
        if key not in _ENCODERS:
            if len(_ENCODERS) >= _ENCODER_CACHE_SIZE:
                _ENCODERS.pop(next(iter(_ENCODERS)))
            _ENCODERS[key] = load_encoder(name, device=device, precision=precision)
        out.append(_ENCODERS[key])
    return out


def clear_caches() -> None:
    """Forget cached CLIP encoders, VQGAN models and Stable Diffusion pipelines (frees their memory)."""
    import importlib

    _ENCODERS.clear()
    for module, name in ((".vqgan", "_MODEL_CACHE"), (".stable_diffusion", "_PIPELINE_CACHE")):
        try:
            getattr(importlib.import_module(module, __package__), name).clear()
        except ImportError:
            continue


def build_clip_loss(opts: Mapping[str, Any], schedule, *, seed: int, device, precision):
    """``guidance.CLIPLoss`` from the guidance options, or ``None`` for ``clip: none``."""
    from guidance import CLIPLoss, Cutouts

    specs = _clip_specs(opts)
    if not specs or schedule is None:
        return None
    encoders = load_encoders([name for name, _ in specs], device=device, precision=precision)
    cutouts = Cutouts(opts["cutouts"], cut_pow=opts["cut_pow"], num_overview=opts["overview"],
                      min_fraction=opts["min_fraction"], augmentations=_augmentations(opts))
    image_losses = {name: opts[f"{name}_weight"] for name in ("tv", "range", "saturation", "symmetry")
                    if opts.get(f"{name}_weight")}
    return CLIPLoss(encoders, schedule, cutouts=cutouts, encoder_weights=[w for _, w in specs],
                    distance=opts["distance"], image_losses=image_losses, seed=seed)


def eval_model_for(opts: Mapping[str, Any]) -> str | None:
    """The evaluation CLIP: as given, ``None`` for 'none', or a different CLIP from the guiding one."""
    value = opts.get("eval_model")
    if value is None or str(value).strip().lower() in NONE_WORDS:
        return None
    if str(value).strip().lower() != "auto":
        return str(value)
    guiding = [name for name, _ in _clip_specs(opts)]
    return DEFAULT_EVAL_ALT if DEFAULT_EVAL in guiding else DEFAULT_EVAL


def score_images(images: torch.Tensor, schedule, *, model: str, step: int, device) -> dict[str, Any]:
    """CLIP score (torchmetrics definition, ``100*cos``) of *images* against the positive text prompts
    active at *step*, weight-averaged over prompts: ``{"clip_score", "per_image", "per_prompt"}``."""
    from guidance.score import clip_score

    prompts = [p for p in schedule.at(step) if p.kind == "text" and p.weight > 0] if schedule else []
    if not prompts:
        return {"clip_score": None, "per_image": [], "per_prompt": {}, "note": "no positive text prompt to score"}
    per_prompt, total, mean, weights = {}, torch.zeros(images.shape[0], dtype=torch.float64), 0.0, 0.0
    for p in prompts:
        scores = clip_score(images, p.value, model=model, reduction="none", device=device).double().cpu()
        per_prompt[p.value] = scores.tolist()
        total += p.weight * scores
        mean += p.weight * max(float(scores.mean()), 0.0)  # torchmetrics clamps the mean at 0
        weights += p.weight
    return {"clip_score": mean / weights, "per_image": (total / weights).tolist(), "per_prompt": per_prompt,
            "definition": "torchmetrics (100*cos; mean clamped at 0), weight-averaged over positive text prompts"}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}  # with its CUDA/CPU build tag
    for dist in ("clipsteer", "transformers", "diffusers", "taming-transformers-rom1504", "kornia",
                 "open_clip_torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist == "clipsteer":
                out[dist] = "source checkout"
    return out


def _prompt_label(opts: Mapping[str, Any], schedule) -> str:
    if opts.get("prompt"):
        return str(opts["prompt"])
    if opts.get("story"):
        return str(opts["story"]) if isinstance(opts["story"], str) else "; ".join(
            f"{k}={v}" for k, v in dict(opts["story"]).items())
    if schedule is not None:
        return "|".join(p.label for p in schedule.at(0))
    return ""


class _Progress:
    """Step callback for the run: tqdm bar (loss shown every few steps), frames, the user's callback."""

    def __init__(self, *, enabled: bool, save_every: int, frames_dir: Path | None, user: Callable | None,
                 refresh: int = 10):
        self.enabled, self.save_every, self.frames_dir, self.user = enabled, save_every, frames_dir, user
        self.refresh = refresh
        self.bar = None
        self.frames: list = []
        self.last: StepInfo | None = None

    def __call__(self, info: StepInfo):
        self.last = info
        if self.enabled:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=info.total, unit="step", dynamic_ncols=True, file=sys.stderr)
            self.bar.update(1)
            done = info.step + 1
            if info.loss is not None and (done % self.refresh == 0 or done == info.total):
                self.bar.set_postfix(loss=f"{float(info.loss):.4f}", refresh=False)  # the only host sync
        if self.save_every and (info.step + 1) % self.save_every == 0:
            self.keep_frame(info.decode(), info.step + 1)
        if self.user is not None:
            return self.user(info)
        return None

    def keep_frame(self, images: torch.Tensor, step: int) -> None:
        from .outputs import frame_name, save_png, to_pil

        frame = to_pil(images[:1])[0]
        self.frames.append(frame)
        if self.frames_dir is not None:
            self.frames_dir.mkdir(exist_ok=True)
            save_png(frame, self.frames_dir / frame_name(step), text={"step": str(step)})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(prompt: str | None = None, *, backend: str | None = None, preset: str | None = None,
             config: str | Path | Mapping | None = None, save: bool = True, callback: Callable | None = None,
             **options) -> Run:
    """Generate image(s) for *prompt* and (with ``save=True``) write a new run folder.

    Args:
        prompt: ``"a lighthouse at dusk:1|fog:0.5"`` (or use ``story=``/``image_prompts=``).
        backend: ``"vqgan"`` (default) or ``"sd"``.
        preset: a named preset (``"toy"``) giving defaults.
        config: a YAML/TOML file (or a dict) of options; keyword options override it.
        save: write the run folder under ``out`` (default ``outputs/``).
        callback: called with each :class:`StepInfo`; return ``False`` to stop early.
        **options: any option of :class:`RunSettings` or of the backend's ``Settings``
            (``iterations=``, ``seed=``, ``size=(W, H)``, ``clip=[...]``...).
    """
    t_start = time.perf_counter()
    backend, opts, provenance = resolve_options(prompt, backend=backend, preset=preset, config=config, **options)
    threads = opts.get("threads")
    if threads is None:
        return _generate(backend, opts, provenance, save=save, callback=callback, t_start=t_start)
    if threads < 1:
        raise ValueError(f"threads is {threads}; give at least 1 (or leave it out for torch's default)")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _generate(backend, opts, provenance, save=save, callback=callback, t_start=t_start)
    finally:
        torch.set_num_threads(before)


def _generate(backend: str, opts: dict[str, Any], provenance: dict, *, save: bool, callback, t_start: float) -> Run:
    from guidance import resolve_device

    seed = opts.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31 - 1)
    opts["seed"] = seed = int(seed)
    device = resolve_device(opts.get("device"))
    precision = opts.get("precision") or "auto"
    schedule = build_schedule(opts)
    if schedule is None:
        raise ValueError("nothing to steer towards: give a text prompt, --story, --image-prompt or --noise-prompt")
    formats = _animation_formats(opts)
    save_every = int(opts.get("save_every") or 0)
    if save_every < 0:
        raise ValueError(f"save_every is {save_every}; use 0 (no frames) or a positive number of steps")
    eval_model = eval_model_for(opts)
    label = _prompt_label(opts, schedule)

    # Build the backend and the guidance (models load here).
    cls = get_generator_class(backend)
    settings = backend_settings(backend, opts)
    clip_loss = build_clip_loss(opts, schedule, seed=seed, device=device, precision=precision)
    generator = cls(settings, device=device, precision=precision)
    if formats and not save_every:
        total = getattr(settings, "iterations", None) or getattr(settings, "steps", None) or 100
        save_every = max(1, int(total) // 30)
    t_loaded = time.perf_counter()

    folder = None
    if save:
        from .outputs import new_run_dir

        folder = new_run_dir(opts.get("out") or "outputs", label)
    progress = _Progress(enabled=bool(opts.get("progress", True)), save_every=save_every,
                         frames_dir=(folder / "frames") if folder is not None else None, user=callback)
    interrupted = False
    try:
        try:
            result = generator.generate(clip_loss, seed=seed, callback=progress)
        except KeyboardInterrupt:
            # A backend that does not catch Ctrl-C itself: keep the last state it reported.
            if progress.last is None:
                raise
            result = GenerationResult(images=progress.last.decode().float().cpu(), interrupted=True,
                                      info={"steps_done": progress.last.step + 1})
    except BaseException:
        progress.close()
        if folder is not None:
            _remove_if_empty(folder)
        raise
    progress.close()
    interrupted = bool(result.interrupted)
    t_generated = time.perf_counter()

    images = result.images.detach().float().cpu().clamp(0, 1)
    steps_done = int(result.info.get("steps_done", len(result.losses)) or 0)
    score: dict[str, Any] = {"clip_score": None}
    if eval_model is not None:
        try:
            score = score_images(images, schedule, model=eval_model, step=max(steps_done - 1, 0), device=device)
        except Exception as err:  # the image is kept whatever happens to its score
            warnings.warn(f"CLIP score with {eval_model!r} failed ({err.__class__.__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}); the image is saved without it",
                          stacklevel=2)
            score = {"clip_score": None, "error": f"{err.__class__.__name__}: {err}"}
    t_scored = time.perf_counter()

    names = ["image.png"] if images.shape[0] == 1 else [f"image-{i}.png" for i in range(images.shape[0])]
    metadata: dict[str, Any] = {
        "prompt": label,
        "seed": seed,
        "backend": backend,
        "clip_score": score.get("clip_score"),
        "image": names[0],
        "images": names,
        "interrupted": interrupted,
        "eval_model": eval_model,
        "clip_scores": score,
        "prompts": {str(k): v for k, v in schedule.as_dict().items()},
        "settings": {k: v for k, v in sorted(opts.items())},
        "backend_settings": asdict(settings) if is_dataclass(settings) else dict(vars(settings)),
        "option_sources": {k: v for k, v in sorted(provenance["sources"].items()) if v != "default"},
        "preset": provenance["preset"],
        "config": provenance["config"],
        "device": str(device),
        "precision": str(generator.dtype).replace("torch.", ""),
        "steps_done": steps_done,
        "info": result.info,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "losses": [float(x) if math.isfinite(float(x)) else None for x in result.losses],
    }
    run = Run(images=images, metadata=metadata, path=folder, clip_score=score.get("clip_score"),
              interrupted=interrupted, frames=progress.frames)
    if folder is not None:
        _save(run, folder, names, formats, float(opts.get("fps") or 10.0), images)
    t_saved = time.perf_counter()
    metadata["timings"] = {
        "load_s": round(t_loaded - t_start, 3), "generate_s": round(t_generated - t_loaded, 3),
        "score_s": round(t_scored - t_generated, 3), "save_s": round(t_saved - t_scored, 3),
        "total_s": round(t_saved - t_start, 3),
        "seconds_per_step": round((t_generated - t_loaded) / steps_done, 4) if steps_done else None,
    }
    if folder is not None:
        from .outputs import SIDECAR, write_json

        write_json(folder / SIDECAR, metadata)
    return run


def backend_settings(backend: str, opts: Mapping[str, Any]):
    """The backend's ``Settings`` from merged options (only the fields it owns; never the run's own
    options, even where a backend field has the same name)."""
    cls = get_generator_class(backend)
    specs = option_specs([backend])
    values = {spec.target: opts[name] for name, spec in specs.items()
              if backend in spec.owners and name in opts and opts[name] is not None}
    return cls.settings_from(values)


def _animation_formats(opts: Mapping[str, Any]) -> list[str]:
    from .outputs import animation_formats

    formats = animation_formats(opts.get("animation"))
    if "mp4" in formats:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError("--animation mp4 needs the imageio-ffmpeg package (it bundles ffmpeg): "
                             "pip install imageio-ffmpeg, or use --animation gif") from None
    return formats


def _save(run: Run, folder: Path, names: list[str], formats: list[str], fps: float, images: torch.Tensor) -> None:
    """Final PNG(s) with metadata and the animation(s); the sidecar is written by the caller, last."""
    import json

    from .outputs import PNG_KEY, save_animation, save_png, to_jsonable, to_pil

    pils = to_pil(images)
    meta = run.metadata
    for i, (name, im) in enumerate(zip(names, pils)):
        text = {"prompt": meta["prompt"], "seed": str(meta["seed"]), "backend": meta["backend"],
                "Software": "clipsteer", PNG_KEY: json.dumps(to_jsonable({**meta, "image": name, "index": i}))}
        if meta.get("clip_score") is not None:
            text["clip_score"] = f"{meta['clip_score']:.4f}"
        run.image_paths.append(save_png(im, folder / name, text=text))
    if formats:
        frames = list(run.frames) + [pils[0]]
        meta["animations"] = []
        for fmt in formats:
            path = save_animation(frames, folder / f"animation.{fmt}", fps=fps)
            meta["animations"].append(path.name)


def _remove_if_empty(folder: Path) -> None:
    try:
        frames = folder / "frames"
        if frames.is_dir() and not any(frames.iterdir()):
            frames.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass


__all__ = ["generate", "Run", "RunSettings", "resolve_options", "option_specs", "load_config", "build_schedule",
           "build_clip_loss", "eval_model_for", "score_images", "load_encoders", "clear_caches", "GROUPS"]
