"""A local web UI for clipsteer (Gradio): the form of every ``generate.py`` option, a live preview, Stop,
and a gallery of the runs in the output folder.

    python scripts/app.py                       # http://127.0.0.1:7860, toy preset, runs under outputs/
    python scripts/app.py --port 8000 --out my_runs --preset none

Needs the ``ui`` extra (``pip install -e '.[ui]'``). Serves on the loopback address unless ``--host``
says otherwise (with a warning: use ``--auth``); ``--share`` (off) would open a public gradio.live link.
The server decides what a caller may set (see README, Security): runs go only under ``--out``, files
are read only from ``--allow-files`` folders, models only from the presets and ``--allow-models``,
sizes and steps up to ``--max-size`` / ``--max-steps``.
"""

import argparse
import sys
from pathlib import Path

from webui.policy import DEFAULT_MAX_SIZE, DEFAULT_MAX_STEPS, ServerPolicy, check_host, read_auth


def main(argv=None) -> int:
    from generators import backend_names
    from generators.runs.presets import preset_names

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only; "
                                                            "any other prints a warning: use --auth)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--out", default="outputs", help="folder in which each run gets a new sub-folder (default: outputs); "
                                                         "the UI writes nowhere else")
    parser.add_argument("--preset", default="toy", choices=["none", *preset_names()],
                        help="preset the form starts with (default: toy)")
    parser.add_argument("--backend", default=None, choices=backend_names(), help="backend the form starts with")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link (off)")
    limits = parser.add_argument_group("what callers may do (checked on the server, whatever the page sends)")
    limits.add_argument("--allow-files", action="append", default=[], metavar="DIR",
                        help="folder whose files (init images, image prompts, config files) the UI may read; "
                             "repeatable (default: none)")
    limits.add_argument("--allow-models", action="append", default=[], metavar="ID_OR_DIR",
                        help="a Hub id, model name or folder the UI may load besides the defaults and presets; "
                             "repeatable")
    limits.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, metavar="PIXELS",
                        help=f"largest image width or height a run may ask for (default: {DEFAULT_MAX_SIZE})")
    limits.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, metavar="N",
                        help=f"most iterations / denoising steps a run may ask for (default: {DEFAULT_MAX_STEPS})")
    limits.add_argument("--auth", metavar="USER:PASS", default=None, help="ask for this login first")
    limits.add_argument("--auth-file", metavar="FILE", default=None,
                        help="ask for a login first: one USER:PASS a line")
    args = parser.parse_args(argv)
    try:
        from webui.app import build_app, launch
    except ImportError as err:
        print(f"error: the web UI needs gradio ({err}); install it with pip install -e '.[ui]'", file=sys.stderr)
        return 2
    try:
        warning = check_host(args.host, args.port)
        auth = read_auth(args.auth, args.auth_file)
        policy = ServerPolicy(Path(args.out), allow_files=tuple(args.allow_files),
                              allow_models=tuple(args.allow_models), max_size=args.max_size, max_steps=args.max_steps)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    demo = build_app(args.out, backend=args.backend, preset=None if args.preset == "none" else args.preset,
                     policy=policy)
    try:
        launch(demo, out=args.out, host=args.host, port=args.port, share=args.share, auth=auth)
    except OSError as err:          # the port was taken meanwhile, or gradio found no free one
        print(f"error: cannot serve on {args.host}:{args.port or 7860} ({err}); give another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
