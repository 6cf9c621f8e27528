"""Quality of each generator on toy world v3: ``python benchmarks/quality.py --help``.

The benchmark itself is the package ``benchmarks/toy_quality`` (variants in ``toyworld/variants.py``;
running, statistics, figures and this command line in its modules). Run as a script, this file's folder
is first on ``sys.path``, so the package imports as ``toy_quality``.
"""

import sys

from toy_quality.cli import main

if __name__ == "__main__":
    sys.exit(main())
