"""Serve the web UI in a subprocess and open it in Debian's headless Chromium (``/usr/bin/chromium``)
through Playwright: for the browser test and for the README's screenshot (``scripts/ui_screenshot.py``).

Chromium is never downloaded: Playwright launches the system binary, with networking features that
reach outside this machine switched off and a fresh profile each time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent


def missing() -> str | None:
    """Why the browser cannot run here (a plain reason), or ``None``."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    for module, extra in (("gradio", "ui"), ("playwright", "test")):
        try:
            __import__(module)
        except ImportError:
            return f"the {module} package is missing (pip install -e '.[{extra}]')"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(out: str | Path, *, args: tuple[str, ...] = (), timeout: float = 120.0, log: Path | None = None,
          cwd: str | Path | None = None):
    """``scripts/app.py --out OUT`` (run in *cwd*) on a free loopback port, offline; yields its URL, stops it after."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("GRADIO_TEMP_DIR", str(Path(cwd or ".", out).resolve() / ".gradio"))
    sink = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "app.py"), "--out", str(out), "--port", str(port),
                             *args], env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"scripts/app.py exited with code {proc.returncode} before serving")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"scripts/app.py did not serve {url} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not None:
            sink.close()


@contextlib.contextmanager
def browser(width: int = 1400, height: int = 1000):
    """A Playwright page in headless system Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": width, "height": height})
        try:
            yield context.new_page()
        finally:
            context.close()


def preview_source(page) -> str | None:
    """The ``src`` of the live preview image, or ``None`` while it shows none."""
    sources = page.eval_on_selector_all("#preview img", "els => els.map(e => e.src)")
    return sources[0] if sources else None


__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "browser", "free_port", "missing", "preview_source", "serve"]
