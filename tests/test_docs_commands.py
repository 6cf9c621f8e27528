"""Every shell command in the README and docs/ still works as written: each script it names exists and its
``--help`` runs; every flag it uses is one of that script's options; the command lines of ``generate.py`` and
``evaluate.py`` parse with their own argument parsers; ``make`` targets exist. A command shown with the error
it gives (its comment says ``error:``) must give an error. Commands of other tools
(pip, accelerate's launcher) are checked for the clipsteer script they start."""

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXTERNAL = {"pip", "-c"}    # other tools' commands and Python one-liners, not clipsteer's: not checked here
#: ``clipsteer COMMAND`` -> the script that is the same command
CLIPSTEER = {"generate": "scripts/generate.py", "evaluate": "scripts/evaluate.py", "ui": "scripts/app.py",
             "train-toy": "scripts/train_toy.py"}


def _commands() -> list[tuple[str, list[str]]]:
    """``(where, tokens)`` of every command line in a bash block of the docs."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).split("\n"):
                tokens = shlex.split(line, comments=True)
                if tokens:
                    found.append((f"{doc.name}: {line.strip()}", tokens))
    return found


COMMANDS = _commands()


def _program(tokens: list[str]) -> tuple[str, list[str]]:
    """(what runs, its arguments): environment assignments, ``nice``, ``python`` and launchers taken off."""
    tokens = [t for t in tokens]
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    if tokens[:1] == ["nice"]:
        tokens = tokens[3:] if tokens[1:2] == ["-n"] else tokens[1:]
    if tokens[:2] == ["accelerate", "launch"]:
        script = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
        tokens = tokens[script:]
    if tokens[:1] == ["clipsteer"]:
        return CLIPSTEER[tokens[1]], tokens[2:]
    if tokens[:1] in (["python"], ["python3"]):
        tokens = tokens[1:]
    if tokens[:2] == ["-m", "generators"]:
        return CLIPSTEER[tokens[2]], tokens[3:]
    if tokens[:1] == ["-m"]:
        return "-m " + tokens[1], tokens[2:]
    return tokens[0], tokens[1:]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@lru_cache(maxsize=None)
def _flags(program: str) -> frozenset:
    """The option strings in *program*'s ``--help`` (which must run)."""
    if program.endswith(".sh"):
        argv = ["bash", program, "--help"]
    elif program.startswith("-m "):
        argv = [sys.executable, "-m", program[3:], "--help"]
    else:
        argv = [sys.executable, program, "--help"]
    done = _run(argv)
    assert done.returncode == 0, f"{program} --help failed: {done.stderr[-1500:]}"
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 50
    assert {"make demo", "make test"} <= {" ".join(t[:2]) for _, t in COMMANDS}


@pytest.mark.parametrize("where,tokens", COMMANDS, ids=[w[:90] for w, _ in COMMANDS])
def test_the_command_runs_or_parses(where, tokens):
    program, args = _program(tokens)
    if program in EXTERNAL:
        return
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert args[0] in targets, f"{where}: no make target {args[0]!r}"
        return
    if not program.startswith("-m "):
        assert (ROOT / program).is_file(), f"{where}: {program} does not exist"
    unknown = sorted({a.partition("=")[0] for a in args if a.startswith("--")} - _flags(program))
    if "error:" in where.partition("#")[2]:            # shown with the error it gives
        assert unknown, f"{where}: the error it shows does not happen"
        return
    assert not unknown, f"{where}: {program} has no option {', '.join(unknown)}"
    if program == "scripts/generate.py":
        from generators.cli import parse_args

        parse_args(args)            # argparse exits (a SystemExit fails the test) on anything it cannot parse
    elif program == "scripts/evaluate.py":
        from generators.evaluate import build_parser

        build_parser().parse_args(args)


def test_the_clipsteer_command_runs():
    done = _run([sys.executable, "-m", "generators", "--version"])
    assert done.returncode == 0 and done.stdout.startswith("clipsteer "), done.stderr
    done = _run([sys.executable, "-m", "generators", "generate", "--help"])
    assert done.returncode == 0 and "--guider" in done.stdout
