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

from generators import batch
from generators.batch import parse_seeds
from generators.run import generate
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
    assert (folder / "image.png").is_file() and (folder / "checkpoint.json").is_file()
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

    from generators.memory import check_fits, needed_bytes
    from generators.vqgan import VQGANSettings

    available = 3 * 10**9
    big = VQGANSettings(width=4096, height=2048, num_images=2)
    with pytest.raises(ValueError, match=r"about (\d+)x(\d+): use --size \1 \2; or --num-images 1; or --precision") as info:
        check_fits("vqgan", big, torch.device("cpu"), available=available)
    width, height = (int(v) for v in str(info.value).split("about ")[1].split(":")[0].split("x"))
    assert width % 16 == 0 and height % 16 == 0 and abs(width / height - 2) < 0.1
    assert 0.9 * available < needed_bytes("vqgan", width, height, 2) <= available     # fits, and little is left
    check_fits("vqgan", VQGANSettings(width=width, height=height, num_images=2), torch.device("cpu"), available=available)
