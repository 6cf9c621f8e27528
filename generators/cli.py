"""The command line of ``scripts/generate.py``: options built from :class:`generators.runs.RunSettings`
and every backend's ``Settings`` dataclass, handed to :func:`generators.runs.generate`.

Only options given on the command line are passed on (argparse defaults are suppressed), so
a preset and a config file can supply the rest: preset < config file < command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from guidance.errors import USER_ERRORS

from . import DEFAULT_BACKEND, backend_names
from .runs.options import option_groups
from .runs import OptionSpec, generate, option_specs

EXAMPLES = """\
examples:
  generate.py "a lighthouse at dusk:1|fog:0.5" --backend vqgan --size 256 256 --iterations 300 --seed 7
  generate.py "a yellow triangle on a purple background" --preset toy
  generate.py "a forest" --story "150=a city at night" --save-every 10 --animation gif
  generate.py "a castle" --clip openai/clip-vit-base-patch32=1 --clip openai/clip-vit-base-patch16=0.5
  generate.py --config run.yaml --seed 3          (the command line overrides the file)
  generate.py --from outputs/20260101-120000-a-forest/00000-7.png --iterations 500   (that image, longer)
  generate.py "a red fox" --preset toy --seeds 0-3          (one run, four images: seeds 0, 1, 2, 3)
  generate.py --resume outputs/20260101-120000-a-forest --iterations 500   (continue a stopped run)
  generate.py --prompts-file prompts.txt --seeds 0-3 --preset toy --out outputs/bench   (a batch; rerun to resume)
  accelerate launch --multi_gpu --num_processes 4 scripts/generate.py --prompts-file geneval.jsonl --seeds 0-3 \
      --export geneval                           (4 processes; GenEval's folder layout in outputs-geneval/)
  python -m generators.vqgan.taming convert last.ckpt my_vqgan/   (pickle-free copy of a checkpoint)
"""


def _value_type(kind: str, optional: bool):
    base = {"int": int, "float": float, "str": str}.get(kind, str)

    def convert(text: str):
        if optional and text.strip().lower() == "none":
            return None
        return base(text)

    convert.__name__ = base.__name__  # argparse names the type in its error messages
    return convert


def _shown(spec: OptionSpec, default: Any) -> str | None:
    if spec.kind == "bool":
        return "on" if default else "off"
    if default in (None, [], ""):
        return None
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


def _help(spec: OptionSpec) -> str:
    main_field = spec.per_owner.get(DEFAULT_BACKEND, spec.field)  # the default backend's wording first
    text = str(main_field.metadata.get("help", "")).replace("%", "%%")
    if len(spec.owners) > 1 and "run" not in spec.owners:  # shared by backends: each has its default
        shown = [(o, _shown(spec, spec.default_for(o))) for o in sorted(spec.owners)]
        listed = ", ".join(f"{o} {v}" for o, v in shown if v is not None)
        return text + (f" (default: {listed})" if listed else "")
    shown = _shown(spec, spec.default)
    return text + (f" (default: {shown})" if shown is not None else "")


def _add(group, spec: OptionSpec) -> None:
    meta = spec.field.metadata
    kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": _help(spec)}
    if meta.get("positional"):
        group.add_argument(spec.name, nargs="?", metavar=spec.name.upper(), **{k: v for k, v in kwargs.items()
                                                                                if k != "dest"})
        return
    flags = [spec.flag] + [a for a in meta.get("aliases", []) if a != spec.flag]
    if spec.kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif spec.kind == "list":
        # one value per flag, repeatable: a prompt written after the flag is never taken as its value
        # (old command lines with several values after one flag are rewritten by _one_value_per_flag)
        kwargs.update(action="append", metavar=meta.get("metavar", "VALUE"))
    else:
        kwargs["type"] = _value_type(spec.kind, spec.optional)
        if spec.choices:
            kwargs["choices"] = spec.choices + ([None] if spec.optional else [])
            kwargs["metavar"] = "{" + ",".join(map(str, spec.choices)) + "}"
        elif meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
    group.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: run options by group, then each backend's options (shared ones once)."""
    from .runs.presets import DESCRIPTIONS, preset_names

    errors: dict[str, str] = {}
    specs = option_specs(errors=errors)
    notes = "".join(f"\nnote: the {name} backend's options are not listed: it failed to import ({err})\n"
                    for name, err in sorted(errors.items()))
    parser = _Parser(
        prog="generate.py",
        description="CLIP-guided text-to-image generation (backends: " + ", ".join(backend_names()) + "). Every option can "
                    "also come from --config FILE (YAML/TOML, keys = option names) or --preset NAME; the "
                    "command line overrides the config file, which overrides the preset.",
        epilog=EXAMPLES + notes, formatter_class=argparse.RawDescriptionHelpFormatter)
    main = parser.add_argument_group("run")
    main.add_argument("--backend", choices=backend_names(), default=argparse.SUPPRESS,
                      help=f"generator backend (default: {DEFAULT_BACKEND})")
    presets = "; ".join(f"{n}: {DESCRIPTIONS.get(n, '')}" for n in preset_names())
    main.add_argument("--preset", choices=preset_names(), default=argparse.SUPPRESS,
                      help=f"named option defaults ({presets})")
    main.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                      help="YAML, TOML or JSON file of options (keys are option names, e.g. iterations: 200)")
    main.add_argument("--from", dest="from_", metavar="PNG_OR_RUN_JSON", default=argparse.SUPPRESS,
                      help="generate an earlier image or run again: a clipsteer PNG (that image), a run.json or run "
                           "folder (that run), or an AUTOMATIC1111 PNG (its prompt, negative prompt, steps, CFG "
                           "scale, seed, size, sampler); any other option given overrides its own")
    main.add_argument("--resume", metavar="RUN_FOLDER", default=argparse.SUPPRESS,
                      help="continue a run from its checkpoint (vqgan, pixels, noise), with its own options, in a "
                           "new run folder (under --out, default beside it); only --iterations, --out, "
                           "--checkpoint-every, --threads, --device, --record-paths and --progress may change")
    main.add_argument("--size", nargs=2, type=int, metavar=("W", "H"), default=argparse.SUPPRESS,
                      help="image size in pixels (sets width and height)")
    main.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                      help="also show the libraries' messages and progress bars (transformers' \"Loading weights\", "
                           "diffusers' warnings); -vv: debug messages")
    main.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                      help="errors only: no progress bar, no warnings")
    _add_batch_options(parser)
    for title, description, group_specs in option_groups(specs):
        group = parser.add_argument_group(title, description)
        for spec in group_specs:
            _add(group, spec)
    _add_diffusers_names(parser, specs)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: an unknown flag is named with the closest option(s), not the usage."""

    def error(self, message: str):
        import difflib
        import re

        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [f for f in unknown.group(1).split() if f.startswith("-")]
            known = [f for action in self._actions for f in action.option_strings if f.startswith("--")]
            if flags:
                flag = flags[0].partition("=")[0]
                ratios = {f: difflib.SequenceMatcher(None, flag, f).ratio() for f in known}
                best = max(ratios.values(), default=0.0)
                close = [f for f in sorted(ratios, key=ratios.get, reverse=True)     # the closest, and any as close
                         if ratios[f] >= max(0.6, best - 0.03)][:3]
                hint = f"; did you mean {' or '.join(close)}?" if close else "; see --help for the options"
                message = f"unknown option {flag}{hint}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_diffusers_names(parser: argparse.ArgumentParser, specs) -> None:
    """diffusers' argument names as flags (``--num-inference-steps``...): passed on under that name, and
    mapped to the chosen backend's option by :data:`generators.runs.options.DIFFUSERS_NAMES`."""
    from .runs.options import DIFFUSERS_NAMES, diffusers_target

    taken = {f for action in parser._actions for f in action.option_strings}
    group = parser.add_argument_group("diffusers names", "diffusers' argument names, for the option each backend "
                                                         "has: " + "; ".join(f"{k}: {' / '.join(v)}"
                                                                             for k, v in DIFFUSERS_NAMES.items()))
    for name in DIFFUSERS_NAMES:
        flag, target = "--" + name.replace("_", "-"), diffusers_target(name, specs)
        if flag in taken or target is None:
            continue
        group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper(),
                           type=_value_type(specs[target].kind, specs[target].optional),
                           help=f"= --{' / --'.join(t.replace('_', '-') for t in DIFFUSERS_NAMES[name])}")


def _add_batch_options(parser: argparse.ArgumentParser) -> None:
    """--prompts-file and its companions (:mod:`generators.runs.batch`)."""
    from .runs.export import LAYOUTS

    group = parser.add_argument_group("batch", "many prompts x seeds, one run folder each and an index "
                                               "(runs.jsonl); run again to skip finished runs; shards over "
                                               "`accelerate launch` processes")
    group.add_argument("--prompts-file", metavar="FILE", default=argparse.SUPPRESS,
                       help="prompts: a text file (one a line), CSV/TSV with a prompt column or JSONL with a "
                            "\"prompt\" key; other columns named like options (seed, backend, iterations...) "
                            "apply to their row")
    group.add_argument("--seeds", metavar="SEEDS", default=argparse.SUPPRESS,
                       help="seeds of every prompt, one token: a range 0-3 or a list 0,2,5 (default: --seed, or 0); "
                            "with one prompt: one run, an image per seed")
    group.add_argument("--export", choices=LAYOUTS, default=argparse.SUPPRESS,
                       help="also copy the finished images into a benchmark layout: geneval (<row>/metadata.jsonl "
                            "+ samples/NNNN.png) or flat (images + captions.csv for evaluate.py --pairs)")
    group.add_argument("--export-dir", metavar="DIR", default=argparse.SUPPRESS,
                       help="folder for --export (default: the --out folder's name + -geneval / -flat); exporting "
                            "again adds new images, and refuses to replace a different one")


def _looks_like_value(name: str, token: str) -> bool:
    """Whether *token*, written after list option *name*'s first value, is another value of it (old
    ``--augment Af Pe Ji`` command lines) rather than the prompt or another argument."""
    import re

    if token.startswith("-") and not re.fullmatch(r"-\d+(:[-+.\deE]+)?", token):
        return False
    if name == "augmentations":
        from guidance.cutouts import ALIASES, augmentation_names

        known = {*augmentation_names(), *ALIASES, "none"}
        return all(part.partition(":")[0].strip().lower() in known for part in token.replace(",", " ").split())
    if name == "noise_prompts":
        return re.fullmatch(r"-?\d+(:[-+.\deE]+){0,2}", token) is not None
    if name == "image_prompts":
        from pathlib import Path

        return Path(token).is_file() or Path(token.rsplit(":", 1)[0]).is_file()
    if any(c.isspace() for c in token):        # model names and paths have no spaces; prompts do
        return False
    if name == "rewards":
        from guidance.rewards import ALIASES, REWARDS

        return token.rpartition("=")[0 if "=" in token else 2].partition(":")[0].strip().lower() in {*REWARDS, *ALIASES}
    if name == "clip":
        from pathlib import Path

        return any(c in token for c in "/=:") or token.lower() in ("none", "off") or Path(token).exists()
    return True


def _one_value_per_flag(argv: list[str], specs) -> list[str]:
    """``--augment Af Pe "a red circle"`` -> ``--augment Af --augment Pe "a red circle"``: each list
    option takes one value per flag; further tokens are kept as its values only while they look like one."""
    flags = {}
    for spec in specs.values():
        if spec.kind == "list":
            for flag in [spec.flag, *spec.field.metadata.get("aliases", [])]:
                flags[flag] = spec.name
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if flag in flags and not eq and i + 1 < len(argv):
            out += [flag, argv[i + 1]]
            i += 2
            while i < len(argv) and _looks_like_value(flags[flag], argv[i]):
                out += [flag, argv[i]]
                i += 1
            continue
        out.append(token)
        i += 1
    return out


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Only the options given on the command line, as ``generate()`` keyword arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        argv = _one_value_per_flag(argv, option_specs())
    args = vars(build_parser().parse_args(argv))
    if "size" in args:
        width, height = args.pop("size")
        args["width"], args["height"] = width, height
    return args


def main(argv: list[str] | None = None) -> int:
    from .runs.logs import verbosity

    args = parse_args(argv)
    level = -1 if args.pop("quiet", False) else args.pop("verbose", 0)
    args.pop("verbose", None)
    if level < 0:
        args.setdefault("progress", False)
    with verbosity(level):
        return _main(args)


def _main(args: dict[str, Any]) -> int:
    if "prompts_file" in args:
        from .runs.batch import main as batch_main

        return batch_main(args)
    stray = [f"--{k.replace('_', '-')}" for k in ("export", "export_dir") if k in args]
    if stray:
        print(f"error: {', '.join(stray)} go(es) with --prompts-file; one run is written to its run folder",
              file=sys.stderr)
        return 2
    try:
        run = generate(**args)
    except KeyboardInterrupt:
        print("\ninterrupted before the first step; nothing saved", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    score = f"{run.clip_score:.2f}" if run.clip_score is not None else "not scored"
    eval_model = run.metadata.get("eval_model")
    where = run.image_path if run.image_path is not None else "(not saved)"
    print(f"{'interrupted; saved' if run.interrupted else 'saved'} {where}")
    if run.interrupted and run.metadata.get("checkpoint"):
        print(f"continue it with: scripts/generate.py --resume {run.path}")
    print(f"seed {run.seed}; CLIP score {score}" + (f" ({eval_model})" if run.clip_score is not None else ""))
    return 130 if run.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
