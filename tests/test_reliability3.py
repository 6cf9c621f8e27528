"""The hostile-user audit, round 3 (issue 31): each defect found, as a test that failed before its fix.

The web UI's trust boundary, driven through its HTTP API, is tested in ``test_webui_server.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from generators.runs import batch
from generators.runs.batch import parse_seeds
from generators.runs import generate
from test_reliability import models, opts  # noqa: F401  (fixtures: tiny models, run options)

ROOT = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under *folder*, byte for byte (nothing already written may change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 3. SIGTERM is Ctrl-C; --seeds in linear time, capped -----------------------------------------------------
def _wait_for(stream, marker: bytes, seen: bytearray, found: threading.Event):
    for chunk in iter(lambda: stream.read1(256), b""):
        seen += chunk
        if marker in seen:
            found.set()
    found.set()


def test_sigterm_saves_the_run_as_ctrl_c_does(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_bytes(b"written before")
    before = _snapshot(out)
    argv = [sys.executable, "scripts/generate.py", "a red circle", "--vqgan", models["vqgan"], "--clip",
            models["clip_a"], "--eval-model", models["clip_b"], "--size", "32", "32", "--iterations", "100000",
            "--cutouts", "2", "--augment", "none", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen, started = bytearray(), threading.Event()
    reader = threading.Thread(target=_wait_for, args=(proc.stderr, b"/100000", seen, started), daemon=True)
    reader.start()
    assert started.wait(300), "the run never started"           # the progress bar shows: a step is done
    assert proc.poll() is None, seen.decode(errors="replace")
    proc.send_signal(signal.SIGTERM)                             # docker stop, Slurm preemption...
    stdout, _ = proc.communicate(timeout=300)
    reader.join(10)
    assert proc.returncode == 130, seen.decode(errors="replace")    # the Ctrl-C path's exit code
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    meta = json.loads((folder / "run.json").read_text())
    assert meta["interrupted"] is True and 1 <= meta["steps_done"] < 100000
    assert (folder / meta["image"]).is_file() and (folder / "checkpoint.json").is_file()
    assert f"--resume {folder}" in stdout.decode()
    assert {k: v for k, v in _snapshot(out).items() if k in before} == before


def test_seed_ranges_parse_in_linear_time_with_a_cap():
    assert parse_seeds("0-99999") == list(range(100000))            # quadratic before: minutes
    assert parse_seeds("5,0-2,9") == [5, 0, 1, 2, 9]
    with pytest.raises(ValueError, match="names seed 1 twice"):
        parse_seeds("0-3,1")
    for text in ("0-100000000", f"0-{2**64 - 1}", ",".join(["0-60000", "60001-120000"])):
        with pytest.raises(ValueError) as info:
            parse_seeds(text)                                         # never expanded: refused at once
        message = str(info.value)
        assert "\n" not in message and f"at most {getattr(batch, 'MAX_SEEDS', None)}" in message and "split" in message


# -- 2. sizes that cannot fit are refused before any model loads ---------------------------------------------
@pytest.mark.parametrize("backend", ["vqgan", "pixels", "sd"])
def test_a_size_that_cannot_fit_is_refused_before_any_model_loads(backend, opts, models, monkeypatch):
    import guidance.build

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the size was checked")

    monkeypatch.setattr(guidance.build, "load_encoders", no_loading)
    extra = {"sd_model": models["sd"], "steps": 2} if backend == "sd" else {}
    with pytest.raises(ValueError) as info:
        generate("a fox", seed=0, backend=backend, save=False, **{**opts, "size": (100000, 100000), **extra})
    message = str(info.value)
    assert "\n" not in message and "needs at least" in message and "the largest size that fits is about" in message
    assert "--size " in message.split("use ", 1)[1]
    assert not Path(opts["out"]).exists()


def test_the_size_said_to_fit_does():
    import torch

    from generators.runs.memory import check_fits, needed_bytes
    from generators.vqgan.backend import VQGANSettings

    available = 3 * 10**9
    big = VQGANSettings(width=4096, height=2048, num_images=2)
    with pytest.raises(ValueError, match=r"about (\d+)x(\d+): use --size \1 \2; or --num-images 1; or --precision") as info:
        check_fits("vqgan", big, torch.device("cpu"), available=available)
    width, height = (int(v) for v in str(info.value).split("about ")[1].split(":")[0].split("x"))
    assert width % 16 == 0 and height % 16 == 0 and abs(width / height - 2) < 0.1
    assert 0.9 * available < needed_bytes("vqgan", width, height, 2) <= available     # fits, and little is left
    check_fits("vqgan", VQGANSettings(width=width, height=height, num_images=2), torch.device("cpu"), available=available)


# -- 4. resume continues only the run its checkpoint belongs to ------------------------------------------------
def _stopped(prompt: str, opts: dict, steps: int = 2):
    return generate(prompt, seed=3, callback=lambda info: info.step + 1 < steps, **{**opts, "iterations": 4})


def test_a_checkpoint_copied_from_another_run_is_refused(opts):
    from generators.runs.checkpoint import CHECKPOINT_JSON, CHECKPOINT_TENSORS

    red, blue = _stopped("a red circle", opts), _stopped("a blue square", opts)
    for name in (CHECKPOINT_JSON, CHECKPOINT_TENSORS):                  # the other run's checkpoint, copied in
        (blue.path / name).write_bytes((red.path / name).read_bytes())
    before = _snapshot(Path(opts["out"]))
    with pytest.raises(ValueError, match="its checkpoint belongs to another run") as info:
        generate(resume=blue.path, progress=False)
    assert "\n" not in str(info.value)
    assert _snapshot(Path(opts["out"])) == before and len(list(Path(opts["out"]).iterdir())) == 2
    assert generate(resume=red.path, progress=False).metadata["steps_done"] == 4     # its own run resumes


@pytest.mark.parametrize("damage, what", [
    (lambda s: {**s, "step": "two"}, "step and total must be counts"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "missing or unknown"),
    (lambda s: {**s, "latents": {"tensor": "state.nowhere"}}, "do not match the tensors file"),
    (lambda s: {**s, "optimizer": {"dict": [["state", {"dict": []}]]}}, "the optimiser state must hold"),
    (lambda s: {**s, "losses": ["x"]}, "losses must be numbers"),
    (lambda s: [], "no state mapping"),
])
def test_a_checkpoint_with_a_broken_state_is_refused_in_one_line(opts, damage, what):
    from generators.runs.checkpoint import CHECKPOINT_JSON

    run = _stopped("a red circle", opts)
    header = json.loads((run.path / CHECKPOINT_JSON).read_text())
    fields = dict(header["state"]["dict"])                           # the state as written: [[key, value], ...]
    damaged = damage(fields)
    header["state"] = {"dict": [[k, v] for k, v in damaged.items()]} if isinstance(damaged, dict) else damaged
    (run.path / CHECKPOINT_JSON).write_text(json.dumps(header))
    before = _snapshot(Path(opts["out"]))
    with pytest.raises(ValueError, match="holds a broken state") as info:
        generate(resume=run.path, progress=False)
    assert what in str(info.value) and "\n" not in str(info.value)
    assert _snapshot(Path(opts["out"])) == before


# -- 6. metadata paths: relative to the run folder, the preset by name ------------------------------------------
def test_recorded_paths_are_relative_and_a_moved_clone_resumes(tmp_path):
    import shutil

    from generators.runs.outputs import PNG_KEY, read_png_text
    from tiny import save_tiny_clip, save_tiny_vqgan

    clone = tmp_path / "clone"
    vqgan = save_tiny_vqgan(clone / "models" / "vqgan", fmt="safetensors")
    clip = save_tiny_clip(clone / "models" / "clip", seed=0, image_size=32)
    image = clone / "pics" / "start.png"
    image.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    opts = dict(vqgan=str(vqgan), clip=[f"{clip}=1"], eval_model="none", size=(32, 32), cutouts=2,
                augmentations=["none"], out=str(clone / "outputs"), progress=False, init_image=str(image))
    full = generate("a red circle", seed=3, **{**opts, "iterations": 4})
    part = _stopped("a red circle", opts)
    for run in (full, part):
        text = (run.path / "run.json").read_text() + read_png_text(run.image_path)[PNG_KEY]
        assert str(tmp_path) not in text                              # no folder of the user's
    meta = json.loads((part.path / "run.json").read_text())
    assert meta["settings"]["vqgan"] == "../../models/vqgan" and meta["settings"]["clip"] == ["../../models/clip=1"]
    assert meta["settings"]["init_image"] == "../../pics/start.png" and meta["settings"]["out"] == ".."
    assert meta["backend_settings"]["vqgan"] == "../../models/vqgan"

    moved = tmp_path / "moved"
    shutil.move(clone, moved)                                         # the whole clone moves: the old paths are gone
    resumed = generate(resume=moved / "outputs" / part.path.name, progress=False)
    assert resumed.metadata["steps_done"] == 4 and resumed.path.parent == moved / "outputs"
    import torch

    assert torch.equal(resumed.images, full.images)                   # the uninterrupted run, bit for bit

    absolute = generate("a red circle", seed=3, **{**opts, "out": str(moved / "outputs"), "vqgan": str(moved / "models" / "vqgan"),
                                                   "clip": [str(moved / "models" / "clip")], "init_image": str(moved / "pics" / "start.png"),
                                                   "iterations": 1, "record_paths": "absolute"})
    assert absolute.metadata["settings"]["vqgan"] == str(moved / "models" / "vqgan")


def test_the_toy_preset_is_recorded_by_name(tmp_path):
    from generators.runs.outputs import PNG_KEY, read_png_text

    run = generate("a red circle", backend="pixels", preset="toy", seed=1, iterations=1, progress=False,
                   out=str(tmp_path))
    text = (run.path / "run.json").read_text() + read_png_text(run.image_path)[PNG_KEY]
    assert str(ROOT) not in text and str(tmp_path) not in text
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["settings"]["clip"] == ["preset toy: clip_a", "preset toy: clip_c", "preset toy: clip_d"]
    assert meta["eval_model"] == meta["settings"]["eval_model"] == "preset toy: clip_b"
    # evaluate.py --held-out still knows which CLIPs steered the run (by the preset, now in this clone)
    from generators.runs.presets import toyworld_weights
    from test_evaluate import evaluate_script

    table = tmp_path / "m.json"
    steering, judge = toyworld_weights("clip_a"), toyworld_weights("clip_b")
    assert evaluate_script.main([str(tmp_path), "--metric", f"clip_score:{steering}", "--metric", f"clip_score:{judge}",
                                 "--held-out", "--json", str(table), "--no-progress"]) == 0
    groups = {(s["metric"], s["group"]): s["n"] for s in json.loads(table.read_text())["summary"]}
    assert groups[(f"clip_score:{steering}", "steered")] == 1 and groups[(f"clip_score:{judge}", "held-out")] == 1


# -- 5. unreadable or unsafe weights: one line naming the fix, never torch's weights_only advice -----------------
@pytest.fixture(scope="module")
def bad_weights(models, tmp_path_factory):
    import argparse
    import shutil

    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("bad_weights")
    truncated = root / "clip_truncated"
    shutil.copytree(models["clip_a"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = root / "clip_pickled"
    shutil.copytree(models["clip_a"], pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    payload = argparse.Namespace(note="an object: torch.load(weights_only=True) refuses it")
    torch.save({**state, "extra": payload}, pickled / "pytorch_model.bin")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": payload}, root / "model.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": payload}, root / "clip.pt")
    return {"truncated": str(truncated), "pickled": str(pickled), "ckpt": str(root / "model.ckpt"),
            "pt": str(root / "clip.pt")}


@pytest.mark.parametrize("case, argv, expected", [
    ("truncated", ["--backend", "pixels", "--iterations", "1", "--clip", "{truncated}"],
     "has a truncated or corrupt safetensors file"),
    ("bin", ["--backend", "pixels", "--iterations", "1", "--clip", "{pickled}"], "its weights are a pickle"),
    ("open_clip", ["--backend", "pixels", "--iterations", "1", "--clip", "open_clip:ViT-B-32/{pt}"],
     "its weights are a pickle"),
    ("sd", ["--backend", "sd", "--sd", "{ckpt}", "--clip", "none", "--steps", "1"], "its weights are a pickle"),
])
def test_unreadable_or_unsafe_weights_give_one_line(case, argv, expected, bad_weights, tmp_path, capsys):
    from generators import cli

    out = tmp_path / "out"
    argv = ["a red circle", *[a.format(**bad_weights) for a in argv], "--eval-model", "none", "--size", "32", "32",
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "weights_only" not in err[0], err
    assert not out.exists()


def test_evaluate_says_one_line_for_a_truncated_clip(bad_weights, opts, tmp_path, capsys):
    from test_evaluate import evaluate_script

    run = generate("a red circle", seed=0, **opts)
    assert evaluate_script.main([str(run.path), "--model", bad_weights["truncated"], "--json", str(tmp_path / "t.json"),
                                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt safetensors file" in err[0] and "download it again" in err[0]


# -- 7. the nits ------------------------------------------------------------------------------------------------
def test_prompts_and_config_files_name_the_problem(tmp_path):
    from generators.runs.batch import read_prompts
    from generators.runs.options import load_config

    with pytest.raises(ValueError, match="is a folder; give a text, CSV or JSONL file"):
        read_prompts(tmp_path)                                       # was: "does not exist"
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts file '.*prompts\.txt' is not UTF-8 text .*save it as UTF-8"):
        read_prompts(latin)
    config = tmp_path / "run.yaml"
    config.write_bytes("prompt: un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"config file '.*run\.yaml' is not UTF-8 text"):
        load_config(config)
    (tmp_path / "run.ini").write_text("iterations = 7\n")
    with pytest.raises(ValueError, match=r"must end in \.yaml, \.yml, \.toml or \.json"):
        load_config(tmp_path / "run.ini")
    (tmp_path / "run.json").write_text('{"iterations": 7}')
    assert load_config(tmp_path / "run.json") == {"iterations": 7}


def test_a_long_prompt_is_warned_about_once(models, tmp_path, capsys):
    from generators import cli

    long_prompt = " ".join(["a very long prompt about a red circle"] * 12)
    argv = [long_prompt, "--backend", "pixels", "--clip", models["clip_a"], "--clip", models["clip_b"],
            "--eval-model", models["clip_b"], "--size", "32", "32", "--iterations", "1", "--cutouts", "2",
            "--augment", "none", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "tokens, longer than" in line or "sequence length" in line]
    assert len(lines) == 1 and len(lines[0]) < 200, err               # two guiding CLIPs and the judge: one line


def test_sd_prompt_alone_is_enough_without_clip_guidance(models):
    run = generate(backend="sd", sd_model=models["sd"], sd_prompt="a red circle", clip_guidance_scale=0.0, steps=2,
                   clip=[models["clip_a"]], eval_model="none", save=False, progress=False)
    assert run.metadata["prompt"] == "a red circle" and run.images.shape[0] == 1
