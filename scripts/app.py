#!/usr/bin/env python
"""The local web UI: ``clipsteer ui``.

A thin wrapper over :func:`webui.cli.main`; ``--help`` lists every option.
"""

import sys

from webui.cli import main

if __name__ == "__main__":
    sys.exit(main())
