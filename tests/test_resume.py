"""Resuming one run: a stopped or Ctrl-C'd optimisation run continued from its checkpoint gives the
uninterrupted run's image bit for bit (CPU), in a new folder, never touching the earlier one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generators import cli
from generators.runs.checkpoint import CHECKPOINT_JSON, CHECKPOINT_TENSORS, load_state
from generators.runs import generate

# Cosine schedule and best-iterate tracking: the optimiser, the schedule, the best state and the
# cutouts' random generator must all come back for the images to match.
STATEFUL = {"lr_schedule": "cosine", "keep_best": True}


def _opts(backend: str, tmp_path: Path, **extra) -> dict:
    return {"backend": backend, "preset": "toy", "seed": 5, "progress": False, "out": str(tmp_path / "out"),
            **STATEFUL, **extra}


def _stop_after(steps: int):
    return lambda info: info.step + 1 < steps


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("backend,iterations", [("vqgan", 6), ("pixels", 6), ("noise", 4)])
def test_a_stopped_run_resumed_equals_the_uninterrupted_one(backend, iterations, tmp_path):
    opts = _opts(backend, tmp_path, iterations=iterations)
    full = generate("a red circle", **opts)
    part = generate("a red circle", callback=_stop_after(2), **opts)
    assert part.metadata["steps_done"] == 2 and part.metadata["checkpoint"] == CHECKPOINT_JSON
    assert not torch.equal(part.images, full.images)
    header = json.loads((part.path / CHECKPOINT_JSON).read_text())      # plain JSON + safetensors, no pickle
    assert header["step"] == 2 and (part.path / CHECKPOINT_TENSORS).is_file()
    assert load_state(part.path).generator is not None                  # the cutouts' RNG state is kept
    before = _files(part.path)

    resumed = generate(resume=part.path, progress=False)
    assert torch.equal(resumed.images, full.images)                      # bit for bit on the CPU
    assert resumed.losses == full.losses and resumed.metadata["steps_done"] == iterations
    assert resumed.path != part.path and resumed.path.parent == part.path.parent
    assert resumed.metadata["resumed_from"] == {"folder": f"../{part.path.name}", "step": 2}   # relative to its run
    assert _files(part.path) == before                                   # the earlier run is untouched
    from PIL import Image

    import numpy as np

    saved = torch.from_numpy(np.asarray(Image.open(resumed.image_path))).permute(2, 0, 1)
    expected = torch.from_numpy(np.asarray(Image.open(full.image_path))).permute(2, 0, 1)
    assert torch.equal(saved, expected)


def test_ctrl_c_keeps_the_last_whole_step_and_resumes(tmp_path):
    opts = _opts("vqgan", tmp_path, iterations=5)
    full = generate("a green cross", **opts)

    def press_ctrl_c(info):
        if info.step == 2:
            raise KeyboardInterrupt

    part = generate("a green cross", callback=press_ctrl_c, **opts)
    assert part.interrupted and part.metadata["steps_done"] == 3
    assert load_state(part.path).step == 3
    resumed = generate(resume=part.path, out=str(tmp_path / "elsewhere"), progress=False)
    assert resumed.path.parent == tmp_path / "elsewhere"
    assert torch.equal(resumed.images, full.images) and resumed.losses == full.losses


def test_checkpoint_every_and_extending_a_finished_run(tmp_path):
    opts = {**_opts("vqgan", tmp_path, iterations=3, checkpoint_every=2), "lr_schedule": "constant"}
    short = generate("a blue square", **opts)
    assert load_state(short.path).step == 3                      # every 2 steps and at the end
    longer = generate("a blue square", **{**opts, "iterations": 5})
    extended = generate(resume=short.path, iterations=5, progress=False)
    assert torch.equal(extended.images, longer.images) and extended.losses == longer.losses
    with pytest.raises(ValueError, match="already did 3 steps"):
        generate(resume=short.path, iterations=2)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def test_bad_resume_requests_are_one_line_errors(tmp_path, capsys):
    opts = _opts("vqgan", tmp_path, iterations=2)
    done = generate("a red circle", **opts)                      # finished, no --checkpoint-every: no checkpoint
    before = _files(done.path)
    runs = sorted(Path(opts["out"]).iterdir())
    code, err = _cli(capsys, "--resume", done.path)
    assert code == 2 and "has no checkpoint" in err and "--checkpoint-every" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    code, err = _cli(capsys, "--resume", tmp_path / "empty")
    assert code == 2 and "is not a run folder" in err and "\n" not in err
    code, err = _cli(capsys, "--resume", tmp_path / "missing")
    assert code == 2 and "no such run folder" in err
    stopped = generate("a red circle", callback=_stop_after(1), **opts)
    runs = sorted(Path(opts["out"]).iterdir())
    code, err = _cli(capsys, "--resume", stopped.path, "--lr", "0.5")
    assert code == 2 and "learning_rate cannot be changed" in err
    code, err = _cli(capsys, "--resume", stopped.path, "a prompt")
    assert code == 2 and "give no prompt" in err
    code, err = _cli(capsys, "--resume", stopped.path, "--iterations", "4")
    assert code == 2 and "cosine lr schedule" in err
    (stopped.path / CHECKPOINT_TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not readable"):
        generate(resume=stopped.path, progress=False)
    assert sorted(Path(opts["out"]).iterdir()) == runs and _files(done.path) == before   # nothing new, nothing changed
    sd = tmp_path / "sd-run"
    sd.mkdir()
    (sd / "run.json").write_text(json.dumps({"backend": "sd", "settings": {"prompt": "a cat", "seed": 1}}))
    code, err = _cli(capsys, "--resume", sd)
    assert code == 2 and "sd backend cannot resume" in err and "same --seed" in err
