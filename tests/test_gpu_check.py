"""``benchmarks/gpu_check.sh``: exits at once without CUDA, and its dry run (the same steps on the CPU, tiny
models) produces every figure, so the script cannot rot while no GPU is around to run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FIGURES = ["vqgan_fp32.json", "vqgan_bf16.json", "sd.json", "score_vit_b_32.json", "score_vit_l_14.json", "noise.json"]


def run(*args, env=None, timeout=60):
    base = {k: v for k, v in os.environ.items() if k != "CLIPSTEER_GPU_CHECK_DRY_RUN"}
    env = {**base, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would measure")
def test_without_cuda_it_exits_at_once_saying_so(tmp_path):
    done = run(tmp_path / "out")
    assert done.returncode == 3
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "out").exists(), "nothing is written without a device"


def test_usage_errors():
    assert run().returncode == 2
    bad = run("--frobnicate", "x")
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


def test_summary_reports_a_failed_and_a_missing_figure(tmp_path):
    (tmp_path / "sd.json").write_text(json.dumps({"error": "guided SD failed; see sd.log"}))
    (tmp_path / "score_vit_b_32.json").write_text(json.dumps({
        "arch": "ViT-B/32", "images": 8, "max_abs_diff_per_pair": 0.0, "speedup_wall": {"clip_score_vs_torchmetrics_update": 3.5},
        "results": {"clipsteer_clip_score": {"images_per_s": 70.0}, "torchmetrics_update_compute": {"images_per_s": 20.0}}}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "| CLIP score ViT-B/32" in done.stdout and "| 3.50x |" in done.stdout
    assert "FAILED: guided SD failed" in done.stdout
    assert "vqgan_fp32.json missing" in done.stderr
    assert "vqgan_nerdyrodent.json" not in done.stderr, "the competitors' rows are optional"


@pytest.mark.slow
def test_dry_run_produces_every_figure(tmp_path):
    out = tmp_path / "gpu"
    done = run(out, env={"CLIPSTEER_GPU_CHECK_DRY_RUN": "1"}, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in FIGURES:
        report = json.loads((out / name).read_text())
        assert "error" not in report, (name, report)
    bf16 = json.loads((out / "vqgan_bf16.json").read_text())["results"]
    assert {r["impl"] for r in bf16} == {"clipsteer", "compiled"} and all(r["precision"] == "bf16" for r in bf16)
    assert next(r for r in bf16 if r["impl"] == "compiled")["compile_speedup"] > 0
    sd = json.loads((out / "sd.json").read_text())
    assert all(sd[impl]["s_per_image"] > 0 for impl in ("clipsteer-full", "clipsteer-x0", "clipsteer-x0-tiny-vae"))
    table = (out / "summary.md").read_text()
    assert table == done.stdout
    assert table.count("\n| ") >= 10 and "FAILED" not in table
    assert "nerdyrodent: skipped" in done.stderr and "no community pipeline row" in done.stderr


def test_a_spent_budget_skips_the_remaining_figures_and_says_so(tmp_path):
    out = tmp_path / "gpu"
    done = run(out, env={"CLIPSTEER_GPU_CHECK_DRY_RUN": "1", "CLIPSTEER_GPU_CHECK_BUDGET": "0"})
    assert done.returncode == 1
    for name in FIGURES:
        assert "budget was spent" in json.loads((out / name).read_text())["error"]
    assert done.stdout.count("FAILED:") == len(FIGURES) and "SKIPPED" in done.stderr
