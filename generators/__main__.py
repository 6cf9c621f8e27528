"""``python -m generators COMMAND ...``: the ``clipsteer`` command (:mod:`generators.commands`)."""

import sys

from generators.commands import main

sys.exit(main())
