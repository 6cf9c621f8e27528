#!/usr/bin/env python
"""Screenshot of the web UI in the middle of a run, for the README (docs/images/ui.png).

    python scripts/ui_screenshot.py                      # toy models, offline; needs /usr/bin/chromium
    python scripts/ui_screenshot.py --out-image /tmp/ui.png --prompt "a red circle on a blue background"

Serves ``scripts/app.py`` on a free loopback port with a fresh output folder, opens it in Debian's
headless Chromium, types the prompt, starts a toy VQGAN+CLIP run and takes the picture once the run
is about a third done; then stops the run. Refuses to replace an existing image unless --overwrite.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the checkout: docs/images is written there


def main(argv=None) -> int:
    from webui import browser as ui_browser

    parser = argparse.ArgumentParser(prog="ui_screenshot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-image", default=str(ROOT / "docs" / "images" / "ui.png"), help="PNG to write")
    parser.add_argument("--prompt", default="a yellow triangle on a purple background")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--seed", default="3")
    parser.add_argument("--at", type=float, default=0.35, help="take it when this share of the run is done")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing image")
    args = parser.parse_args(argv)
    target = Path(args.out_image)
    if target.exists() and not args.overwrite:
        print(f"error: {target} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    why = ui_browser.missing()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, \
            ui_browser.serve("outputs", cwd=tmp, args=("--max-steps", str(args.iterations))) as url, \
            ui_browser.browser(1400, 900) as page:
        page.goto(url)
        page.wait_for_selector("#start")
        page.fill("#opt-prompt textarea", args.prompt)
        page.click("#group-output > button")
        page.fill("#opt-seed textarea, #opt-seed input", args.seed)
        page.click("#group-output > button")                      # closed again: the picture shows the run
        page.click("#group-shared-backend-options > button")
        page.fill("#opt-iterations input", str(args.iterations))
        page.click("#group-shared-backend-options > button")
        page.fill("#preview-every input", "2")
        page.click("#start")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = page.inner_text("#progress")
            if "step " in text:
                done = int(text.split("step ", 1)[1].split("/", 1)[0])
                if done >= args.at * args.iterations:
                    break
            time.sleep(0.1)
        else:
            print("error: the run did not get far enough in 300 s", file=sys.stderr)
            return 1
        time.sleep(0.6)                                               # let the plot and preview draw
        page.evaluate("window.scrollTo(0, 0)")
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target))
        page.click("#stop")
        page.wait_for_function("document.querySelector('#status').innerText.includes('seed ')",
                               timeout=60_000)                        # saved (interrupted, or done)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
