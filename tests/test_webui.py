"""The web UI's form <-> options mapping, its run jobs (Stop = Ctrl-C) and its gallery, without a server.

The form is built from the same option metadata as the command line, so these tests compare it with
``generators.cli``: every CLI option has a field, a run started from the form records what the same
command line records, and bad input gives the CLI's own error.
"""

import json
from dataclasses import dataclass

import pytest
import torch

import generators
from generators.base import GenerationResult, Generator, option
from generators.cli import build_parser, parse_args
from generators.runs.outputs import read_metadata
from generators.runs.session import generate
from webui.form import (
    CLI_ONLY,
    form_fields,
    form_groups,
    form_values,
    run_options,
    shown,
    values_from_run,
)
from webui.gallery import list_runs
from webui.jobs import Job

PROMPT = "a red circle on a blue background"


def _cli_dests() -> set[str]:
    return {a.dest for a in build_parser()._actions if a.dest != "help"}


def test_every_cli_option_has_a_form_field_and_every_field_an_option():
    names = {f.name for f in form_fields()}
    expected = (_cli_dests() - {"size", *CLI_ONLY}) | {"width", "height"}   # --size W H sets width and height
    assert expected <= names, f"CLI options without a form field: {sorted(expected - names)}"
    assert names <= _cli_dests() | {"width", "height"}, f"fields that are no CLI option: {sorted(names - _cli_dests())}"


def test_groups_follow_the_cli_help_groups():
    titles = [g.title for g in build_parser()._action_groups
              if g.title not in ("positional arguments", "options") and not all(
                  a.dest in CLI_ONLY for a in g._group_actions)]
    assert [t for t, _, _ in form_groups()] == titles


@pytest.mark.parametrize("backend", generators.backend_names())
def test_form_values_round_trip_to_no_options(backend):
    # the form shows the merged defaults; unchanged, it passes on nothing but backend and preset
    assert run_options(form_values(backend, "toy")) == {"backend": backend, "preset": "toy"}
    assert run_options(form_values(backend, None)) == {"backend": backend}


def test_a_config_file_fills_the_form(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("iterations: 42\nclip: [a, b]\nseed: 9\n")
    values = form_values("vqgan", "toy", str(config))
    assert (values["iterations"], values["clip"], values["seed"]) == (42, "a\nb", "9")
    assert run_options(values) == {"backend": "vqgan", "preset": "toy", "config": str(config)}
    values["iterations"] = 43
    assert run_options(values)["iterations"] == 43


def test_changed_fields_become_typed_options():
    values = form_values("vqgan", "toy")
    values.update(prompt=PROMPT, seed="18446744073709551615", iterations=7, clip="a\n\nb\n", grad_clip="0.5",
                  min_fraction="", init_noise="pixels", keep_best=True, steps=3)   # steps: the sd backend's
    assert run_options(values) == {"backend": "vqgan", "preset": "toy", "prompt": PROMPT,
                                   "seed": 2**64 - 1, "iterations": 7, "clip": ["a", "b"], "grad_clip": 0.5,
                                   "min_fraction": "none", "init_noise": "pixels", "keep_best": True}


def test_shown_fields_are_the_backends_own():
    names, titles = shown("pixels")
    assert {"parameterisation", "iterations", "prompt", "backend"} <= names
    assert not {"steps", "vqgan", "sd_model"} & names
    assert "sd backend" not in titles and "pixels backend" in titles


@dataclass
class _SparkleSettings:
    sparkle: float = option(0.25, "how much it sparkles", minimum=0)
    width: int = option(64, "image width")
    height: int = option(64, "image height")


class _Sparkle(Generator):
    name = "sparkle"
    Settings = _SparkleSettings

    def generate(self, objective, *, seed=0, callback=None):
        images = torch.full((1, 3, self.settings.height, self.settings.width), self.settings.sparkle)
        return GenerationResult(images=images, steps_done=1)


def test_a_new_backend_option_appears_in_the_form_without_a_ui_edit():
    generators.register("sparkle", _Sparkle)
    try:
        groups = {title: [f.name for f in fields] for title, _, fields in form_groups()}
        assert groups["sparkle backend"] == ["sparkle"]
        field = next(f for f in form_fields() if f.name == "sparkle")
        assert field.widget == "number" and field.help == "how much it sparkles"
        values = form_values("sparkle")
        assert values["sparkle"] == 0.25
        values["sparkle"] = 0.75
        assert run_options(values) == {"backend": "sparkle", "sparkle": 0.75}
    finally:
        generators._REGISTRY.pop("sparkle")


def _cli_run(argv, capsys=None):
    return generate(**parse_args(argv))


@pytest.mark.e2e
def test_a_run_from_the_form_records_what_the_cli_records(tmp_path):
    argv = [PROMPT, "--backend", "pixels", "--preset", "toy", "--seed", "5", "--iterations", "3", "--cutouts", "4",
            "--augment", "Af", "--augment", "Ji", "--out", str(tmp_path / "cli"), "--no-progress", "--lr", "0.2"]
    cli = _cli_run(argv)
    values = form_values("pixels", "toy")
    values.update(prompt=PROMPT, seed="5", iterations=3, cutouts=4, augmentations="Af\nJi", out=str(tmp_path / "ui"),
                  progress=False, learning_rate=0.2)
    ui = generate(**run_options(values))
    a, b = read_metadata(cli.path), read_metadata(ui.path)
    a["settings"]["out"] = b["settings"]["out"]
    for key in ("prompt", "seed", "backend", "settings", "backend_settings", "preset", "prompts", "steps_done"):
        assert a[key] == b[key], key
    a["option_sources"]["out"] = b["option_sources"]["out"]
    assert a["option_sources"] == b["option_sources"]
    assert torch.equal(cli.images, ui.images)                     # the same image, bit for bit

    # "reuse settings": the form filled from the run's run.json starts the same run again
    again = generate(**run_options(values_from_run(b, ui.path)))
    assert torch.equal(again.images, ui.images)
    assert read_metadata(again.path)["settings"] == b["settings"]


@pytest.mark.parametrize("argv, change", [
    (["--cutouts", "0"], {"cutouts": 0}),
    (["--lr", "-1"], {"learning_rate": -1}),
    (["--seed", "-3"], {"seed": "-3"}),
    (["--augment", "bogus"], {"augmentations": "bogus"}),
])
def test_bad_input_gives_the_cli_error(tmp_path, argv, change):
    base = [PROMPT, "--backend", "pixels", "--preset", "toy", "--iterations", "1", "--out", str(tmp_path)]
    with pytest.raises(ValueError) as cli_error:
        _cli_run(base + argv)
    values = form_values("pixels", "toy")
    values.update(prompt=PROMPT, iterations=1, out=str(tmp_path), **change)
    job = Job(run_options(values)).start()
    assert list(job.updates()) == []
    assert job.error == f"error: {cli_error.value}"
    assert "\n" not in job.error and not any(tmp_path.iterdir())   # one line, nothing written


def test_the_runs_warnings_are_the_clis(tmp_path):
    values = form_values("sd", "toy")
    values.update(prompt=PROMPT, out=str(tmp_path), progress=False, steps=2, strength=0.5)   # no init image
    job = Job(run_options(values)).start()
    for _ in job.updates():
        pass
    assert job.error is None
    assert job.warning_lines() == ["warning: --strength does nothing without --init-image or --layout-sketch (sd backend); it is ignored"]


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["vqgan", "sd"])
def test_stop_saves_the_run_interrupted_as_ctrl_c_does(tmp_path, backend):
    values = form_values(backend, "toy")
    values.update(prompt=PROMPT, seed="2", out=str(tmp_path), progress=False, iterations=40, steps=50)
    job = Job(run_options(values), preview_every=2).start()
    previews = []
    for batch in job.updates():
        previews += [s.image for s in batch if s.image is not None]
        if len(job.steps) >= 4 and not job.stopping:
            job.stop()
    job.join()
    run = job.run
    assert job.error is None and run.interrupted
    meta = read_metadata(run.path)
    assert meta["interrupted"] is True and meta["stopped_at"] is None
    assert 4 <= meta["steps_done"] < (40 if backend == "vqgan" else 50)
    assert run.image_path.is_file() and len(meta["losses"]) == meta["steps_done"]
    assert len(previews) >= 2 and previews[0].size == (64, 64)
    assert [s.step for s in job.steps] == list(range(len(job.steps)))

    # the gallery's Resume: the stopped run goes on from its checkpoint where the backend keeps one
    resumed = Job({"resume": str(run.path), "out": str(tmp_path)}).start()
    for _ in resumed.updates():
        pass
    if backend == "vqgan":
        assert resumed.error is None and resumed.run.path != run.path
        again = read_metadata(resumed.run.path)
        assert again["steps_done"] == 40 and not again["interrupted"]
        assert (resumed.run.path / again["resumed_from"]["folder"]).resolve() == run.path.resolve()
    else:
        assert resumed.error.startswith("error: --resume: the sd backend cannot resume a run")


def test_gallery_lists_runs_newest_first_and_skips_broken_ones(tmp_path):
    import os

    for i, name in enumerate(["b-run", "a-run", "c-run"]):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "image.png").write_bytes(b"")
        (folder / "run.json").write_text(json.dumps({"prompt": name, "seed": i, "backend": "vqgan", "clip_score": 1.5,
                                                     "images": ["image.png"], "settings": {"seed": i}}))
        os.utime(folder / "run.json", (1000 + i, 1000 + i))
    (tmp_path / "a-run" / "animation.gif").write_bytes(b"")
    meta = json.loads((tmp_path / "a-run" / "run.json").read_text())
    (tmp_path / "a-run" / "run.json").write_text(json.dumps({**meta, "animations": ["animation.gif"], "interrupted": True}))
    os.utime(tmp_path / "a-run" / "run.json", (1001, 1001))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    (tmp_path / "no-run").mkdir()
    entries = list_runs(tmp_path)
    assert [e.folder.name for e in entries] == ["c-run", "a-run", "b-run"]
    assert entries[0].caption == "c-run · seed 2 · vqgan · score 1.50"
    assert entries[0].files == [tmp_path / "c-run" / "image.png"]
    assert "| seed | 2 |" in entries[0].describe()
    assert entries[1].files == [tmp_path / "a-run" / "image.png", tmp_path / "a-run" / "animation.gif"]
    assert entries[1].caption.endswith("(interrupted)")
    assert list_runs(tmp_path / "missing") == []
