"""The run API (generators.runs.generate) and the CLI (scripts/generate.py) on tiny local models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from generators import cli
from generators.runs import presets
from generators.runs.outputs import read_metadata, read_png_text
from generators.runs import build_schedule, eval_model_for, generate, load_config, resolve_options
from tiny import save_tiny_clip, save_tiny_vqgan

ROOT = Path(__file__).resolve().parent.parent
INTERFACE_FLAGS = ("--backend", "--clip", "--vqgan", "--size", "--iterations", "--seed", "--out", "--init-image",
                   "--config", "--preset")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vqgan": str(save_tiny_vqgan(root / "vqgan", fmt="safetensors")),
            "clip_a": str(save_tiny_clip(root / "clip_a", seed=0, image_size=32)),
            "clip_b": str(save_tiny_clip(root / "clip_b", seed=1, image_size=32))}


@pytest.fixture
def opts(models, tmp_path):
    """Options for a quick run on the tiny models."""
    return dict(vqgan=models["vqgan"], clip=[models["clip_a"]], eval_model=models["clip_b"], size=(32, 32),
                iterations=4, cutouts=2, min_fraction=0.6, augmentations=["none"], out=str(tmp_path / "out"),
                progress=False)


def test_run_folder_png_metadata_and_sidecar(opts):
    run = generate("a red circle:1|blurry:-0.5", seed=7, **opts)
    assert run.path.parent == Path(opts["out"]) and run.path.name.endswith("-a-red-circle-blurry")
    assert run.image_path == run.path / "00000-7.png" and run.image_path.is_file()
    assert run.image.size == (32, 32) and run.images.shape == (1, 3, 32, 32)
    from guidance import clip_score

    # scored against the positive text prompt only, by the evaluation CLIP (torchmetrics definition)
    assert run.clip_score == pytest.approx(float(clip_score(run.images, "a red circle", model=opts["eval_model"])),
                                           abs=1e-4)
    sidecar = json.loads((run.path / "run.json").read_text())
    for key in ("prompt", "seed", "backend", "clip_score", "image", "settings", "versions", "timings", "losses"):
        assert key in sidecar, key
    assert sidecar["prompt"] == "a red circle:1|blurry:-0.5" and sidecar["seed"] == 7
    assert sidecar["backend"] == "vqgan" and sidecar["image"] == "00000-7.png"
    assert sidecar["clip_score"] == pytest.approx(run.clip_score)
    # models are recorded relative to the run folder (and read back by --resume, the UI and evaluate.py)
    assert sidecar["eval_model"] == os.path.relpath(opts["eval_model"], run.path)
    assert len(sidecar["losses"]) == 4 and sidecar["steps_done"] == 4 and not sidecar["interrupted"]
    assert sidecar["settings"]["iterations"] == 4 and sidecar["backend_settings"]["width"] == 32
    assert sidecar["versions"]["torch"] == torch.__version__
    assert sidecar["timings"]["total_s"] > 0
    assert sidecar["prompts"]["0"][1] == {"kind": "text", "value": "blurry", "weight": -0.5, "stop": None}
    text = read_png_text(run.image_path)
    assert text["parameters"].startswith("a red circle:1|blurry:-0.5\n") and "prompt" not in text
    assert text["seed"] == "7" and text["backend"] == "vqgan"
    embedded = read_metadata(run.image_path)
    assert embedded["settings"] == sidecar["settings"] and embedded["seed"] == 7
    assert run.metadata["settings"]["clip"] == [os.path.relpath(opts["clip"][0], run.path)]


def test_threads_option_is_restored(opts):
    before = torch.get_num_threads()
    seen = []
    run = generate("a red circle", seed=1, save=False, threads=1, callback=lambda i: seen.append(torch.get_num_threads()),
                   **opts)
    assert seen and set(seen) == {1} and run.metadata["settings"]["threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads.*at least 1"):
        generate("a red circle", seed=1, save=False, threads=0, **opts)


def test_second_run_never_overwrites_the_first(opts):
    first = generate("a red circle", seed=1, **opts)
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    second = generate("a red circle", seed=2, **opts)
    assert second.path != first.path and second.path.is_dir()
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before


def test_seed_reproduces_bit_exact_and_save_false(opts, tmp_path):
    opts.update(out=str(tmp_path / "nothing"), augmentations=["Af", "Ji"], num_images=2)
    a = generate("a blue square", seed=5, save=False, **opts)
    b = generate("a blue square", seed=5, save=False, **opts)
    c = generate("a blue square", seed=6, save=False, **opts)
    assert a.path is None and not (tmp_path / "nothing").exists()
    assert torch.equal(a.images, b.images) and a.losses == b.losses
    assert not torch.equal(a.images, c.images)
    assert len(a.pil_images) == 2 and len(a.metadata["clip_scores"]["per_image"]) == 2


def test_frames_animation_and_story(opts, models):
    opts.update(iterations=6, save_every=2, animation="both", fps=4)
    run = generate("a red circle", story="3=a blue square", seed=0, **opts)
    frames = sorted(p.name for p in (run.path / "frames").iterdir())
    assert frames == ["step-000002.png", "step-000004.png", "step-000006.png"]
    assert (run.path / "animation.gif").is_file() and (run.path / "animation.mp4").is_file()
    assert set(run.metadata["prompts"]) == {"0", "3"}
    assert run.metadata["animations"] == ["animation.gif", "animation.mp4"]


def test_ctrl_c_saves_the_current_image_marked_interrupted(opts):
    def interrupt(info):
        if info.step == 1:
            raise KeyboardInterrupt

    opts["iterations"] = 50
    run = generate("a red circle", seed=3, callback=interrupt, **opts)
    assert run.interrupted and run.image_path.is_file()
    sidecar = json.loads((run.path / "run.json").read_text())
    assert sidecar["interrupted"] is True and sidecar["steps_done"] == 2
    assert json.loads(read_png_text(run.image_path)["clipsteer"])["interrupted"] is True


def test_config_file_applies_and_arguments_override(opts, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"iterations": 3, "seed": 9, "lr": 0.05, "size": [32, 32], "cut-pow": 2.0,
                                   "vqgan": {"optimiser": "RMSprop"}}))
    backend, merged, _ = resolve_options("a fox", config=cfg, iterations=5)
    assert backend == "vqgan"
    assert merged["iterations"] == 5 and merged["seed"] == 9 and merged["learning_rate"] == 0.05
    assert merged["cut_pow"] == 2.0 and merged["optimizer"] == "RMSprop" and merged["width"] == 32
    toml = tmp_path / "run.toml"
    toml.write_text('iterations = 2\nseed = 4\n[guidance]\ncutouts = 3\n')
    assert load_config(toml) == {"iterations": 2, "seed": 4, "cutouts": 3}
    opts.pop("iterations")
    opts.pop("cutouts")
    run = generate("a red circle", config=toml, **opts)
    assert run.metadata["steps_done"] == 2 and run.seed == 4 and run.metadata["settings"]["cutouts"] == 3
    assert run.metadata["option_sources"]["iterations"] == os.path.relpath(toml, run.path)   # recorded relative


def test_preset_config_cli_precedence(opts, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(presets.PRESETS, "tinytest", lambda backend=None: {
        "vqgan": opts["vqgan"], "clip": opts["clip"], "eval_model": "none", "width": 32, "height": 32,
        "iterations": 7, "cutouts": 2, "seed": 1, "augmentations": ["none"], "sd_model": "/nowhere"})
    _, merged, info = resolve_options("x", preset="tinytest")
    assert merged["iterations"] == 7 and merged["seed"] == 1 and info["preset"] == "tinytest"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tinytest\niterations: 3\nseed: 2\n")
    _, merged, _ = resolve_options("x", config=cfg)
    assert merged["iterations"] == 3 and merged["seed"] == 2 and merged["cutouts"] == 2
    out = tmp_path / "cli-out"
    code = cli.main(["a red circle", "--config", str(cfg), "--iterations", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    (folder,) = out.iterdir()
    meta = read_metadata(folder)
    assert meta["steps_done"] == 2 and meta["seed"] == 2 and meta["preset"] == "tinytest"
    assert meta["clip_score"] is None and meta["eval_model"] is None
    assert "saved" in capsys.readouterr().out


def test_cli_parses_interface_spellings(models):
    args = cli.parse_args(["a lighthouse at dusk:1|fog:0.5", "--backend", "vqgan", "--size", "256", "128",
                           "--iterations", "300", "--seed", "7", "--clip", "a=1", "--clip", "b=0.5",
                           "--vqgan", "wikiart_16384", "--out", "somewhere", "--init-image", "x.png",
                           "--augment", "Af", "Pe", "Ji", "Er", "--optimiser", "adamw", "--lr", "0.2",
                           "--no-progress", "--min-fraction", "none"])
    assert args == {"prompt": "a lighthouse at dusk:1|fog:0.5", "backend": "vqgan", "width": 256, "height": 128,
                    "iterations": 300, "seed": 7, "clip": ["a=1", "b=0.5"], "vqgan": "wikiart_16384",
                    "out": "somewhere", "init_image": "x.png", "augmentations": ["Af", "Pe", "Ji", "Er"],
                    "optimizer": "adamw", "learning_rate": 0.2, "progress": False, "min_fraction": None}
    assert cli.parse_args([]) == {}


def test_help_lists_the_interface():
    text = cli.build_parser().format_help()
    for flag in INTERFACE_FLAGS:
        assert flag in text, flag
    for group in ("prompts:", "guidance:", "output:", "runtime:", "vqgan backend:"):
        assert group in text, group
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--help"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert all(flag in result.stdout for flag in INTERFACE_FLAGS)


def test_cli_end_to_end_in_a_subprocess(models, tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "a red circle", "--vqgan", models["vqgan"],
           "--clip", models["clip_a"], "--eval-model", "none", "--size", "32", "32", "--iterations", "3",
           "--cutouts", "2", "--seed", "5", "--out", str(tmp_path), "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    (folder,) = tmp_path.iterdir()
    assert (folder / "00000-5.png").is_file() and read_metadata(folder)["seed"] == 5


def test_cli_errors_are_one_line(models, tmp_path, capsys):
    argv = ["a red circle", "--vqgan", models["vqgan"], "--clip", models["clip_a"], "--eval-model", "none",
            "--size", "30", "32", "--iterations", "2", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: width 30 does not suit this VQGAN: it must be a multiple of 4 (its downsampling "
                   "factor); use 28 or 32"]
    assert not any(tmp_path.iterdir()), "a failed run leaves no folder behind"
    assert cli.main(argv[:7] + ["--size", "32", "32", "--optimizer", "Lion", "--out", str(tmp_path)]) == 2
    assert "unknown optimizer 'Lion'" in capsys.readouterr().err


@pytest.mark.parametrize("options, error, match", [
    (dict(optimizer="DiffGrad"), ValueError, "unknown optimizer 'DiffGrad'"),
    (dict(size=(30, 32)), ValueError, r"width 30 does not suit this VQGAN: it must be a multiple of 4 .*use 28 or 32"),
    (dict(vqgan="/no/such/vqgan"), FileNotFoundError, "neither a known model"),
    (dict(clip=["/no/such/clip"]), FileNotFoundError, "CLIP model folder"),
    (dict(image_prompts=["/no/such.png"]), FileNotFoundError, "image prompt"),
    (dict(iteratons=3), ValueError, "unknown option 'iteratons'.*did you mean 'iterations'"),
    (dict(iterations="many"), ValueError, "option iterations .* must be a whole number"),
    (dict(animation="avi"), ValueError, "unknown animation format"),
    (dict(backend="dalle"), ValueError, "unknown backend 'dalle'"),
    (dict(preset="nope"), ValueError, "unknown preset 'nope'"),
    (dict(config="/no/such.yaml"), FileNotFoundError, "config file"),
    (dict(story="a forest; 10=a city"), ValueError, "needs a step"),
])
def test_bad_options_give_one_line_errors(opts, options, error, match, tmp_path):
    opts.update(options)
    with pytest.raises(error, match=match) as info:
        generate("a red circle", seed=0, **opts)
    assert "\n" not in str(info.value)
    assert not Path(opts["out"]).exists() or not any(Path(opts["out"]).iterdir())


def test_bad_config_files(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.toml").write_text("iterations = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "b.toml")
    (tmp_path / "c.ini").write_text("x=1")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml, \.toml or \.json"):
        load_config(tmp_path / "c.ini")


def test_schedule_and_eval_model_choice(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    schedule = build_schedule({"prompt": "a fox:2|snow", "story": "50=a city", "image_prompts": [f"{tmp_path}/p.png:0.5"],
                               "noise_prompts": ["42:0.1"]})
    assert [p.value for p in schedule.at(0)][:2] == ["a fox", "snow"]
    assert [p.kind for p in schedule.at(60)] == ["text", "image", "noise"]
    assert build_schedule({"prompt": None}) is None
    with pytest.raises(ValueError, match="step 0"):
        build_schedule({"prompt": "a", "story": "0=b; 5=c"})
    assert eval_model_for({"clip": ["openai/clip-vit-base-patch32"], "eval_model": "auto"}) == \
        "openai/clip-vit-large-patch14"
    assert eval_model_for({"clip": ["openai/clip-vit-large-patch14=1"], "eval_model": "auto"}) == \
        "openai/clip-vit-base-patch16"
    assert eval_model_for({"clip": ["x"], "eval_model": "none"}) is None
    assert eval_model_for({"clip": ["x"], "eval_model": "my/clip"}) == "my/clip"


def test_toy_preset_paths():
    from toyworld import paths

    preset = presets.get_preset("toy", backend=None) if (paths.WEIGHTS_DIR / "clip_a").is_dir() \
        and (paths.WEIGHTS_DIR / "vqgan").is_dir() else None
    if preset is None:
        with pytest.raises(FileNotFoundError, match="toy model"):
            presets.get_preset("toy")
        pytest.skip("toy weights are not trained yet")
    assert preset["clip"] == [str(paths.weights_dir(name)) for name in ("clip_a", "clip_c", "clip_d")]
    assert preset["eval_model"] == str(paths.weights_dir("clip_b", check=False))
    assert preset["vqgan"] == str(paths.weights_dir("vqgan")) and preset["width"] == 64


def test_backend_options_are_generic(monkeypatch, opts):
    """A new backend plugs in through its Settings dataclass: its fields become options; a field
    named like a run option (prompt) gets a backend-prefixed name; a broken backend is skipped."""
    import dataclasses

    import generators
    from generators.base import GenerationResult, Generator
    from generators.runs import backend_settings, option_specs

    @dataclasses.dataclass
    class FakeSettings:
        prompt: str = dataclasses.field(default="", metadata={"help": "conditioning text", "flag": "--fake-prompt"})
        width: int = dataclasses.field(default=8, metadata={"help": "width"})
        steps: int = dataclasses.field(default=3, metadata={"help": "steps"})
        tags: list[str] = dataclasses.field(default_factory=list, metadata={"help": "tags"})

    class Fake(Generator):
        name = "fake"
        Settings = FakeSettings

        def generate(self, clip_loss, *, seed=0, callback=None):
            s = self.settings
            return GenerationResult(images=torch.full((1, 3, s.width, s.width), 0.5), info={"prompt": s.prompt})

    monkeypatch.setitem(generators._REGISTRY, "fake", Fake)
    monkeypatch.setitem(generators._REGISTRY, "broken", "generators.no_such_backend:Nothing")
    specs = option_specs(["fake"])
    assert specs["fake_prompt"].target == "prompt" and specs["prompt"].owners == ["run"]
    assert "vqgan" not in specs["width"].owners and "fake" in specs["width"].owners
    settings = backend_settings("fake", {"prompt": "a fox:1|snow", "fake_prompt": "a fox", "width": 4, "steps": 2})
    assert settings == FakeSettings(prompt="a fox", width=4, steps=2)
    text = cli.build_parser().format_help()
    assert "fake backend:" in text and "--fake-prompt" in text and "--tags" in text
    assert "the broken backend's options are not listed" in text
    assert cli.parse_args(["x", "--fake-prompt", "y", "--tags", "a", "b"]) == \
        {"prompt": "x", "fake_prompt": "y", "tags": ["a", "b"]}
    opts.pop("iterations")
    opts.pop("vqgan")
    run = generate("a red circle", backend="fake", fake_prompt="a fox", seed=0, **{**opts, "size": (6, 6)})
    assert run.images.shape == (1, 3, 6, 6) and run.metadata["info"] == {"prompt": "a fox"}
    assert run.metadata["backend_settings"]["prompt"] == "a fox"
    with pytest.warns(UserWarning, match=r"ignoring option\(s\) iterations \(.*vqgan.* backend\)"):
        generate("a red circle", backend="fake", iterations=3, save=False, **{**opts, "size": (6, 6)})


def test_toy_preset_runs_offline(tmp_path):
    from toyworld import paths

    if not all((paths.WEIGHTS_DIR / n).is_dir() for n in ("clip_a", "clip_b", "vqgan")):
        pytest.skip("toy weights are not trained yet")
    run = generate("a yellow triangle on a purple background", preset="toy", seed=0, iterations=3,
                   out=str(tmp_path), progress=False)
    assert run.images.shape == (1, 3, 64, 64) and run.image_path.is_file()
    assert run.metadata["eval_model"] == "preset toy: clip_b"          # the preset's model, by name
    assert isinstance(run.clip_score, float) and run.metadata["preset"] == "toy"
    assert run.metadata["settings"]["min_fraction"] == 0.6
