"""clipsteer's local web UI (``scripts/app.py``): a Gradio front end over the Python API.

:mod:`webui.form`, :mod:`webui.jobs` and :mod:`webui.gallery` do not import gradio (they are tested on
their own); :mod:`webui.app` builds the page; :mod:`webui.browser` serves it and opens headless Chromium.
"""
