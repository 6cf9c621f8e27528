"""benchmarks/retrain_time.py: the scheduler it predicts with lays tasks out as train_toy.py does."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import retrain_time
from toyworld.train import PRIORITY, TASK_DEPS

ROOT = Path(__file__).resolve().parent.parent


def test_extrapolation_is_the_line_through_the_two_short_runs():
    assert retrain_time.extrapolate(0.01, 110.0, 0.03, 130.0) == pytest.approx(1100.0)
    # a second run faster than the first (noise) predicts no growth, not a negative time
    assert retrain_time.extrapolate(0.01, 50.0, 0.03, 40.0) == 50.0


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_simulated_schedule_respects_dependencies_and_lanes(jobs):
    durations = {t: 10.0 + 7 * i for i, t in enumerate(PRIORITY)}
    plan = retrain_time.simulate(durations, jobs)
    spans = plan["spans"]
    assert set(spans) == set(durations)
    for task, (start, end) in spans.items():
        assert end - start == pytest.approx(durations[task])
        for dep in TASK_DEPS[task]:
            assert spans[dep][1] <= start, f"{task} started before {dep} ended"
    moments = sorted({s for s, _ in spans.values()})
    assert max(sum(1 for s, e in spans.values() if s <= m < e) for m in moments) <= jobs
    chain, _ = retrain_time.longest_chain(durations)
    assert plan["wall_seconds"] >= max(chain, sum(durations.values()) / jobs) - 1e-9
    if jobs == 1:
        assert plan["wall_seconds"] == pytest.approx(sum(durations.values()))


def test_longest_chain_follows_the_toy_sd_and_its_student():
    durations = {t: 1.0 for t in TASK_DEPS}
    durations.update(clip_a=5.0, sd_vae=50.0, sd=100.0, sd_turbo=20.0, guided=3.0)
    seconds, chain = retrain_time.longest_chain(durations)
    assert chain == ["sd_vae", "sd", "sd_turbo"] and seconds == 170.0
    # without the student in the run, the chain ends with the guided samples of the toy SD
    del durations["sd_turbo"]
    assert retrain_time.longest_chain(durations) == (153.0, ["sd_vae", "sd", "guided"])


def test_bad_scales_are_refused_before_anything_trains(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "retrain_time.py"), "--json",
                          str(tmp_path / "r.json"), "--scales", "0.05", "0.02"], capture_output=True, text=True)
    assert out.returncode == 2 and "0 < S1 < S2 < 1" in out.stderr
    assert not (tmp_path / "r.json").exists()
