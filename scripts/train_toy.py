#!/usr/bin/env python
"""Train the toy world's models: ``clipsteer train-toy``.

A thin wrapper over :func:`toyworld.train.cli`; ``--help`` lists every option.
"""

from toyworld.train import cli, finished_tasks  # noqa: F401  (finished_tasks: tests load this script)

if __name__ == "__main__":
    raise SystemExit(cli())
