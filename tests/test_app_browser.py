"""The web UI in a real browser: ``scripts/app.py`` on a free loopback port, driven by Debian's headless
Chromium through Playwright (never a downloaded browser). Type a toy prompt, start, watch the preview
change, stop, find the run in the gallery, reuse its settings, resume it.

Skipped, with the reason, where ``/usr/bin/chromium``, gradio or playwright is missing; ``.ci/run``
installs Chromium first, so CI always runs it.
"""

import json
import time

import pytest

from webui import browser as ui_browser

why = ui_browser.missing()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(why is not None, reason=f"browser test skipped: {why}")]

PROMPT = "a yellow triangle on a purple background"
OTHER = "a green square on a white background"
LONG = 5000          # iterations: far more than the test waits for (it stops the run), even on a loaded machine


def _wait(condition, timeout: float, what: str, page=None):
    """Poll *condition* until it is true; on time-out, say what the page's status showed (if *page* given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    shown = f"; #status showed {page.inner_text('#status')!r}" if page is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{shown}")


def _open_group(page, group: str, field: str) -> None:
    """Open a closed group of the form. Gradio mounts a closed group's fields only when it opens, and a
    value typed while a field is still receiving its initial value can be lost: wait until it shows one."""
    page.click(f"#{group} > button")
    _wait(lambda: page.locator(field).count() == 1 and page.input_value(field) != "", 30, f"{group}'s fields")
    time.sleep(1.0)


def _type_number(page, selector: str, value: str) -> None:
    """Type *value* into a number field and leave it (Tab), so gradio commits it before the next click;
    typed again if the field does not keep it."""
    for _ in range(3):
        page.fill(selector, value)
        page.press(selector, "Tab")
        time.sleep(0.5)
        if page.input_value(selector) == value:
            return
    raise AssertionError(f"{selector} does not keep the value {value!r}")


def _upload(page, selector: str, path, condition, what: str) -> None:
    """Give *path* to the file input *selector* until *condition* holds: a file set while gradio is still
    mounting the component can be dropped without a trace, so it is given again (three tries, 20 s each)."""
    for attempt in range(3):
        page.set_input_files(selector, str(path))
        try:
            _wait(condition, 20, what)
            return
        except AssertionError:
            if attempt == 2:
                raise


def test_start_preview_stop_gallery_reuse(tmp_path):
    out = tmp_path / "runs"
    with ui_browser.serve(out, log=tmp_path / "app.log", args=("--max-steps", str(LONG))) as url, \
            ui_browser.browser() as page:
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
        page.goto(url)
        page.wait_for_selector("#start")
        page.fill("#opt-prompt textarea", PROMPT)
        _open_group(page, "group-shared-backend-options", "#opt-iterations input")   # to set a long run
        _type_number(page, "#opt-iterations input", "-1")             # bad input: the CLI's error, in the page
        page.click("#start")
        # the first event also waits for the page's queue connection: generous on a loaded CI machine
        _wait(lambda: page.inner_text("#status").startswith(
            "error: option --iterations (from arguments) is -1; it must be at least 0"), 120, "the error", page)
        _type_number(page, "#opt-iterations input", str(LONG))
        _type_number(page, "#preview-every input", "2")
        page.click("#start")

        seen = []

        def three_previews():
            src = ui_browser.preview_source(page)
            if src and src not in seen:
                seen.append(src)
            return len(seen) >= 3
        _wait(three_previews, 60, "the preview to change twice", page)
        assert "step" in page.inner_text("#progress") and "ETA" in page.inner_text("#progress")

        # a second tab waits in the queue, and sees its place in it
        other = page.context.new_page()
        other.goto(url)
        other.wait_for_selector("#start")
        other.fill("#opt-prompt textarea", OTHER)
        other.click("#start")
        _wait(lambda: "queue: 1/1" in other.inner_text("#status"), 30, "the second tab's queue place", other)

        page.click("#stop")
        status = _wait(lambda: "interrupted; saved" in (t := page.inner_text("#status")) and t, 60,
                       "the stopped run to be saved", page)
        runs = [p for p in out.iterdir() if (p / "run.json").is_file()]
        assert len(runs) == 1
        meta = json.loads((runs[0] / "run.json").read_text())
        assert meta["interrupted"] is True and meta["prompt"] == PROMPT and 0 < meta["steps_done"] < LONG
        assert str(runs[0]) in status

        # then it runs; its own Stop stops it
        _wait(lambda: other.inner_text("#status").startswith("running"), 60, "the second tab's run to start", other)
        other.click("#stop")
        _wait(lambda: "seed " in other.inner_text("#status"), 60, "the second run to be saved", other)
        other.close()

        _wait(lambda: PROMPT in page.inner_text("#gallery"), 30, "the run in the gallery")
        page.click(f"#gallery button.thumbnail-item:has-text('{PROMPT}')")
        _wait(lambda: PROMPT in page.inner_text("#run-details"), 30, "the run's details")
        assert f"seed {meta['seed']}" in page.inner_text("#run-details")
        _wait(lambda: page.locator(f'#run-files a[download="{meta["image"]}"]').count() == 1, 30, "the PNG to download")

        page.fill("#opt-prompt textarea", "something else")
        _type_number(page, "#opt-iterations input", "7")
        page.click("#reuse")
        _wait(lambda: page.input_value("#opt-prompt textarea") == PROMPT, 30, "reuse to fill the prompt")
        assert page.input_value("#opt-iterations input") == str(LONG)
        page.click("#group-output > button")
        assert page.input_value("#opt-seed textarea, #opt-seed input") == str(meta["seed"])

        # Resume continues the selected (stopped) run from its checkpoint, in a new folder
        page.click("#resume")
        _wait(lambda: page.inner_text("#status").startswith("running"), 60, "the resumed run to start", page)
        page.click("#stop")
        _wait(lambda: "interrupted; saved" in page.inner_text("#status"), 60, "the resumed run to be saved", page)
        resumed = [m for m in (json.loads(p.read_text()) for p in out.glob("*/run.json")) if m.get("resumed_from")]
        assert [m["resumed_from"]["folder"] for m in resumed] == [f"../{runs[0].name}"]   # relative to the run
        assert resumed[0]["prompt"] == PROMPT and resumed[0]["steps_done"] > meta["steps_done"]
        assert outside == []                                              # the page fetched nothing from elsewhere


def test_upload_an_init_image_and_drop_a_png_to_reuse_its_settings(tmp_path):
    from PIL import Image

    out = tmp_path / "runs"
    init = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    with ui_browser.serve(out, log=tmp_path / "app.log") as url, ui_browser.browser() as page:
        page.goto(url)
        page.wait_for_selector("#start")
        page.fill("#opt-prompt textarea", PROMPT)
        _open_group(page, "group-shared-backend-options", "#opt-iterations input")
        _type_number(page, "#opt-iterations input", "3")
        _upload(page, "#upload-init-image input[type=file]", init,
                lambda: "start.png" in page.inner_text("#upload-init-image"), "the upload")
        page.click("#start")
        _wait(lambda: "seed " in page.inner_text("#status"), 120, "the run to be saved", page)
        (folder,) = [p for p in out.iterdir() if (p / "run.json").is_file()]
        meta = json.loads((folder / "run.json").read_text())
        assert meta["settings"]["init_image"] == "inputs/start.png" and meta["inputs"] == ["inputs/start.png"]
        assert (folder / "inputs" / "start.png").read_bytes() == init.read_bytes()     # a copy, in the run folder

        page.fill("#opt-prompt textarea", "something else")
        _type_number(page, "#opt-iterations input", "9")
        page.set_input_files("#settings-drop input[type=file]", str(folder / meta["image"]))
        _wait(lambda: page.input_value("#opt-prompt textarea") == PROMPT, 30, "the dropped PNG to fill the form")
        assert page.input_value("#opt-iterations input") == "3"
