#!/usr/bin/env python
"""Score images against their captions with CLIP (and reward models): ``clipsteer evaluate``.

A thin wrapper over :func:`generators.evaluate.main`; ``--help`` lists every option.
"""

import sys

from generators.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
