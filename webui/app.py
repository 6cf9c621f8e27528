"""The Gradio web UI: the form (:mod:`webui.form`), a live run (:mod:`webui.jobs`) and the gallery of
run folders (:mod:`webui.gallery`). It calls the Python API and holds no generation logic.

One run at a time per process (the Start event's queue has one slot; a second tab sees its place in
the queue). Gradio's analytics and version check are off and nothing is shared unless asked.
"""

import html
import os
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"   # before gradio is imported: it must not phone home

import gradio as gr

from generators import DEFAULT_BACKEND
from generators.runs.record import RunRecord
from guidance.errors import USER_ERRORS

from .form import (
    KEPT_ON_SWITCH,
    FormField,
    form_groups,
    form_values,
    run_options,
    shown,
    values_from_file,
    values_from_run,
)
from .gallery import RunEntry, list_runs
from .jobs import Job, Step, eta
from .policy import MAX_UPLOAD_BYTES, ServerPolicy

CSS = """
#preview img, #gallery img { image-rendering: pixelated; }
#preview img { width: 100%; height: 100%; object-fit: contain; }
#status { min-height: 2.5em; }
#live { position: sticky; top: 8px; align-self: flex-start; }
.gradio-container { overflow: visible !important; }   /* else the live column cannot stay in view */
"""
PLOT_POINTS = 300          # steps shown in the loss plot (evenly spread over the run)


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _component(field: FormField, value: Any, visible: bool):
    common = {"label": field.label, "info": field.help, "elem_id": f"opt-{field.name}", "visible": visible}
    if field.widget == "choice":
        return gr.Dropdown(choices=field.choices, value=value, **common)
    if field.widget == "bool":
        return gr.Checkbox(value=value, **common)
    if field.widget in ("int", "number"):
        return gr.Number(value=value, precision=0 if field.widget == "int" else None, **common)
    if field.widget == "lines":
        common["info"] = f"{field.help} (one per line)"
        return gr.Textbox(value=value, lines=2, max_lines=8, **common)
    positional = field.spec is not None and field.spec.field.metadata.get("positional")
    return gr.Textbox(value=value, lines=2 if positional else 1, **common)


def _plot_frame(steps: list[Step]):
    import pandas as pd

    if len(steps) > PLOT_POINTS:
        stride = len(steps) / PLOT_POINTS
        steps = [steps[int(i * stride)] for i in range(PLOT_POINTS)] + [steps[-1]]
    rows = []
    for s in steps:
        if s.loss is not None:
            rows.append({"step": s.step + 1, "value": s.loss, "series": "loss"})
        if len(s.parts) > 1:     # one part alone is the loss itself
            rows.extend({"step": s.step + 1, "value": v, "series": k} for k, v in s.parts.items())
    frame = pd.DataFrame(rows, columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


def _progress_html(steps: list[Step], stopping: bool) -> str:
    if not steps:
        return ""
    last = steps[-1]
    per_step, left = eta(steps)
    timing = f" · {per_step:.3f} s/step · ETA {left:.0f} s" if per_step is not None else ""
    label = " · stopping" if stopping else ""
    return (f'<progress value="{last.step + 1}" max="{last.total}" style="width:100%"></progress>'
            f'<div id="progress-text">step {last.step + 1}/{last.total}{timing}{label}</div>')


def _with_warnings(text: str, job: Job) -> str:
    lines = job.warning_lines()
    return text + ("\n\n" + "  \n".join(html.escape(w) for w in lines) if lines else "")


def _summary(run) -> str:
    """The run's last lines, as ``scripts/generate.py`` prints them."""
    where = run.image_path if run.image_path is not None else "(not saved)"
    score = f"{run.clip_score:.2f} ({run.metadata.get('eval_model')})" if run.clip_score is not None else "not scored"
    return f"{'interrupted; saved' if run.interrupted else 'saved'} `{where}`  \nseed {run.seed}; CLIP score {score}"


def build_app(out: str | Path = "outputs", *, backend: str | None = None, preset: str | None = "toy",
              policy: ServerPolicy | None = None) -> gr.Blocks:
    """The Blocks app; runs write to *out*, whose run folders the gallery lists. *policy* (default: files
    from nowhere, models from the presets, the default caps) decides what a caller may set: every run's
    options are checked on the server, whatever the page sent (:mod:`webui.policy`)."""
    policy = policy if policy is not None else ServerPolicy(Path(out))
    out = str(policy.out)
    backend = backend or DEFAULT_BACKEND
    groups = form_groups()
    initial = form_values(backend, preset)
    initial["out"] = out
    names, titles = shown(backend)
    jobs: dict[str, Job] = {}

    with gr.Blocks(analytics_enabled=False, title="clipsteer") as demo:
        gr.Markdown("## clipsteer\nSteer an image with CLIP: every option of `scripts/generate.py`, "
                    f"a live preview, and every run kept under `{html.escape(out)}`.")
        fields: dict[str, Any] = {}
        accordions: dict[str, Any] = {}
        with gr.Row():
            with gr.Column(scale=2):
                for title, description, group in groups:
                    with gr.Accordion(f"{title}: {description}", open=title in ("run", "prompts"),
                                      visible=title in titles, elem_id=f"group-{_slug(title)}") as accordion:
                        for field in group:
                            fields[field.name] = _component(field, initial[field.name], field.name in names)
                    accordions[title] = accordion
                fields["out"].interactive = False         # the gallery's folder: set by --out
                with gr.Row():            # uploads: copied into the run folder that uses them
                    init_upload = gr.File(label="init image (upload)", file_types=["image"], type="filepath",
                                          elem_id="upload-init-image")
                    prompt_uploads = gr.File(label="image prompts (upload)", file_types=["image"], type="filepath",
                                             file_count="multiple", elem_id="upload-image-prompts")
                    settings_drop = gr.File(label="reuse settings: drop a PNG or run.json", type="filepath",
                                            file_types=[".png", ".json"], elem_id="settings-drop")
                preview_every = gr.Number(value=0, precision=0, elem_id="preview-every",
                                          label="preview every N steps (0: about 25 previews per run)")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="start")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=3, elem_id="live"):
                status = gr.Markdown(elem_id="status")
                progress = gr.HTML(elem_id="progress")
                preview = gr.Image(label="preview", type="pil", format="png", height=320, interactive=False,
                                   elem_id="preview")
                plot = gr.LinePlot(x="step", y="value", color="series", title="loss and its parts", height=260,
                                   elem_id="loss-plot")
        gr.Markdown(f"### Runs in `{html.escape(out)}`, newest first")
        with gr.Row():
            with gr.Column(scale=3):
                gallery = gr.Gallery(columns=6, height=360, allow_preview=False, elem_id="gallery", label="runs")
            with gr.Column(scale=2):
                with gr.Row():
                    reuse = gr.Button("Reuse settings", elem_id="reuse")
                    resume = gr.Button("Resume", elem_id="resume")
                    refresh = gr.Button("Refresh", elem_id="refresh")
                files = gr.File(label="download", file_count="multiple", interactive=False, elem_id="run-files")
                details = gr.Markdown(elem_id="run-details", max_height=420)
        listed = gr.State([])
        selected = gr.State(None)

        order = list(fields)
        form_outputs = [fields[n] for n in order] + [accordions[t] for t, _, _ in groups]

        def fill(values: dict[str, Any], chosen: str) -> list:
            names_now, titles_now = shown(chosen)
            return ([gr.update(value=values[n], visible=n in names_now) for n in order]
                    + [gr.update(visible=t in titles_now) for t, _, _ in groups])

        def gallery_update():
            entries = [e for e in list_runs(out) if e.image is not None]
            return gr.update(value=[(str(e.image), e.caption) for e in entries]), [str(e.folder) for e in entries]

        def switch(*args):
            """Backend, preset or config file changed: their options fill the form; what to draw is kept."""
            current = dict(zip(order, args))
            try:
                policy.check_config(str(current["config"] or "").strip())
                values = form_values(current["backend"], None if current["preset"] == "none" else current["preset"],
                                     current["config"] or None)
            except USER_ERRORS as err:
                return [gr.skip()] * len(form_outputs) + [f"error: {err}"]
            values.update({n: current[n] for n in KEPT_ON_SWITCH})
            return fill(values, current["backend"]) + [""]

        def stream(job: Job, session: str):
            """Run *job*, yielding the page's updates: status, progress, preview, plot, then the gallery."""
            jobs[session] = job.start()
            yield {status: "loading models…", progress: "", preview: None, plot: None}
            try:
                for batch in job.updates():
                    update = {status: _with_warnings("stopping: the current image will be saved, marked interrupted"
                                                     if job.stopping else "running", job), progress: _progress_html(job.steps, job.stopping),
                              plot: _plot_frame(job.steps)}
                    images = [s.image for s in batch if s.image is not None]
                    if images:
                        update[preview] = images[-1]
                    yield update
            finally:
                if not job.done:              # the page went away: end the run as Stop does
                    job.stop()
                    job.join()
                jobs.pop(session, None)
            if job.error is not None:
                yield {status: _with_warnings(job.error, job)}
                return
            pictures, folders = gallery_update()
            yield {status: _with_warnings(_summary(job.run), job), preview: job.run.image, progress: _progress_html(job.steps, False),
                   gallery: pictures, listed: folders}

        def start_run(request: gr.Request, *args):
            values = dict(zip(order, args[:-3]))
            try:
                policy.check_config(str(values.get("config") or "").strip())   # before the file is read
                options, uploads = with_uploads(run_options(values), args[-2], args[-1])
                options = policy.check_run(options, uploads)
                options["keep_inputs"] = True
                every = int(args[-3] or 0)
            except (*USER_ERRORS, TypeError) as err:
                yield {status: f"error: {err}"}
                return
            yield from stream(Job(options, preview_every=every), request.session_hash)

        def with_uploads(options: dict[str, Any], init: str | None, prompts: list[str] | None):
            """The uploaded init image and image prompts in the run's options, and the uploads' paths."""
            uploads = []
            if init:
                uploads.append(policy.check_upload(init, "init image"))
                options["init_image"] = str(uploads[-1])
            for path in prompts or []:
                uploads.append(policy.check_upload(path, "image prompt"))
                options["image_prompts"] = list(options.get("image_prompts") or []) + [str(uploads[-1])]
            return options, tuple(uploads)

        def reuse_file(path: str | None):
            """A dropped PNG or run.json: its settings fill the form."""
            if not path:
                return [gr.skip()] * len(form_outputs) + [gr.skip()]
            try:
                values = values_from_file(policy.check_upload(path, "reuse settings"))
            except USER_ERRORS as err:
                return [gr.skip()] * len(form_outputs) + [f"error: {err}"]
            values["out"] = out
            return fill(values, values["backend"]) + [f"settings of `{Path(path).name}` in the form"]

        def resume_run(request: gr.Request, folder: str | None, every):
            """Continue the selected run from its checkpoint, in a new run folder under --out."""
            if not folder:
                yield {status: "select a run in the gallery first"}
                return
            try:
                folder, every = policy.run_folder(folder), int(every or 0)
            except (*USER_ERRORS, TypeError) as err:
                yield {status: f"error: {err}"}
                return
            yield from stream(Job({"resume": str(folder), "out": out}, preview_every=every), request.session_hash)

        def stop_run(request: gr.Request) -> None:
            # the status line is the run's stream's alone: it says "stopping" at the next step, then the
            # summary; an answer from here could arrive after the summary and hide it
            job = jobs.get(request.session_hash)
            if job is not None and not job.done:
                job.stop()

        def select_run(folders: list[str], evt: gr.SelectData):
            if evt.index is None or evt.index >= len(folders):
                return gr.skip(), gr.skip(), None
            try:
                folder = policy.run_folder(folders[evt.index])
                entry = RunEntry.read(folder)
            except USER_ERRORS as err:
                return f"error: {err}", None, None
            return entry.describe(), [str(p) for p in entry.files], str(folder)

        def reuse_run(folder: str | None):
            if not folder:
                return [gr.skip()] * len(form_outputs) + ["select a run in the gallery first"]
            try:
                folder = policy.run_folder(folder)
                values = values_from_run(RunRecord.read(folder), folder)
            except USER_ERRORS as err:
                return [gr.skip()] * len(form_outputs) + [f"error: {err}"]
            values["out"] = out
            return fill(values, values["backend"]) + [f"settings of `{Path(folder).name}` in the form"]

        form_inputs = [fields[n] for n in order]
        for name in ("backend", "preset"):
            fields[name].input(switch, form_inputs, form_outputs + [status], concurrency_limit=None)
        for event in (fields["config"].submit, fields["config"].blur):     # its options fill the form
            event(switch, form_inputs, form_outputs + [status], concurrency_limit=None)
        run_outputs = [status, progress, preview, plot, gallery, listed]
        start.click(start_run, form_inputs + [preview_every, init_upload, prompt_uploads], run_outputs, concurrency_limit=1, concurrency_id="run",
                    show_progress_on=[status])
        resume.click(resume_run, [selected, preview_every], run_outputs, concurrency_limit=1, concurrency_id="run",
                     show_progress_on=[status])
        stop.click(stop_run, None, None, concurrency_limit=None, concurrency_id="stop", show_progress="hidden")
        gallery.select(select_run, listed, [details, files, selected], concurrency_limit=None)
        reuse.click(reuse_run, selected, form_outputs + [status], concurrency_limit=None)
        settings_drop.upload(reuse_file, settings_drop, form_outputs + [status],
                             concurrency_limit=None)
        refresh.click(gallery_update, None, [gallery, listed], concurrency_limit=None)
        demo.load(gallery_update, None, [gallery, listed], concurrency_limit=None)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, *, out: str | Path, host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, block: bool = True, auth: list[tuple[str, str]] | None = None):
    """Serve *demo* (gradio's own analytics off, server-side rendering off, files only from *out*; with
    *auth*, a login of one of those (user, password) pairs first)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(Path(out).resolve())],
                       ssr_mode=False, mcp_server=False, show_error=True, prevent_thread_lock=not block, css=CSS,
                       quiet=not block, auth=auth, max_file_size=MAX_UPLOAD_BYTES)


__all__ = ["CSS", "build_app", "launch"]
