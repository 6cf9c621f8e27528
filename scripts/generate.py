#!/usr/bin/env python
"""Generate an image from a text prompt with CLIP guidance (VQGAN+CLIP or Stable Diffusion).

    python scripts/generate.py "a lighthouse at dusk:1|fog:0.5" --backend vqgan --size 256 256 --iterations 300 --seed 7
    python scripts/generate.py "a yellow triangle on a purple background" --preset toy

A thin wrapper over :func:`generators.runs.generate`; ``--help`` lists every option.
"""

import sys

from generators.cli import main

if __name__ == "__main__":
    sys.exit(main())
