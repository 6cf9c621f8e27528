#!/usr/bin/env python
"""A local web UI for clipsteer (Gradio): the form of every ``generate.py`` option, a live preview, Stop,
and a gallery of the runs in the output folder.

    python scripts/app.py                       # http://127.0.0.1:7860, toy preset, runs under outputs/
    python scripts/app.py --port 8000 --out my_runs --preset none

Needs the ``ui`` extra (``pip install -e '.[ui]'``). Serves on the loopback address unless ``--host``
says otherwise; ``--share`` (off) would open a public gradio.live link.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from generators import backend_names
    from generators.presets import preset_names

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--out", default="outputs", help="folder in which each run gets a new sub-folder (default: outputs)")
    parser.add_argument("--preset", default="toy", choices=["none", *preset_names()],
                        help="preset the form starts with (default: toy)")
    parser.add_argument("--backend", default=None, choices=backend_names(), help="backend the form starts with")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link (off)")
    args = parser.parse_args(argv)
    try:
        from webui.app import build_app, launch
    except ImportError as err:
        print(f"error: the web UI needs gradio ({err}); install it with pip install -e '.[ui]'", file=sys.stderr)
        return 2
    demo = build_app(args.out, backend=args.backend, preset=None if args.preset == "none" else args.preset)
    launch(demo, out=args.out, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
