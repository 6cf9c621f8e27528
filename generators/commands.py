"""The ``clipsteer`` command (``python -m generators`` too): one entry point for the project's commands.

    clipsteer generate "a red fox" --preset toy     # scripts/generate.py: generators.cli
    clipsteer evaluate outputs/                     # scripts/evaluate.py: generators.evaluate
    clipsteer ui --preset toy                       # scripts/app.py: webui.cli (needs the [ui] extra)
    clipsteer train-toy --only clip                 # scripts/train_toy.py: toyworld.train
    clipsteer --version

Each command takes the same options as its script (``clipsteer COMMAND --help``).
"""

from __future__ import annotations

import importlib
import sys

#: command -> (module:function, what it does)
COMMANDS = {
    "generate": ("generators.cli:main", "generate images from a prompt (one run, or a batch with --prompts-file)"),
    "evaluate": ("generators.evaluate:main", "score images against their captions (CLIP score, reward models)"),
    "ui": ("webui.cli:main", "serve the local web UI"),
    "train-toy": ("toyworld.train:cli", "retrain the toy world's models"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("clipsteer")
    except PackageNotFoundError:          # run from a checkout that is not installed
        return "unknown"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return ("usage: clipsteer COMMAND [OPTIONS]   (clipsteer COMMAND --help lists a command's options)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n  --version  the installed version\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"clipsteer {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"clipsteer: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[command][0].partition(":")
    sys.argv = [f"clipsteer {command}", *rest]     # the command's usage line names it
    return int(getattr(importlib.import_module(module), function)(rest) or 0)
