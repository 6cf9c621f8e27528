"""How long ``scripts/train_toy.py`` takes on this machine, predicted from two short runs of it:
``python benchmarks/retrain_time.py --help``.

Runs the real retrain command twice into scratch folders, at two small ``--steps-scale`` values (every step
count of every model multiplied by it; the same ``--jobs``), reads each task's wall seconds from the
``training_metrics.json`` each run writes, and extrapolates every task linearly to scale 1: what grows with the
steps gives the slope, what does not (loading, the measurements at the end) the intercept. It then lays the
predicted tasks out on ``--jobs`` lanes the way ``train_toy.py``'s scheduler does (``TASK_DEPS``, ``PRIORITY``
in ``toyworld/train.py``) and reports the predicted wall time of a full run, the one-thread work it holds and
its longest chain of dependent tasks.

    python benchmarks/retrain_time.py --json retrain.json                     # scales 0.01 and 0.03, 2 jobs
    python benchmarks/retrain_time.py --scales 0.02 0.05 --json retrain.json  # longer, closer to a full run

A prediction, not a measurement: a full run timed (``time nice -n 10 python scripts/train_toy.py --out DIR``)
is the measurement. The short runs are two processes side by side, as a full run is, so the rates include
their contention.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def extrapolate(s1: float, t1: float, s2: float, t2: float, to: float = 1.0) -> float:
    """The straight line through (s1, t1) and (s2, t2) at scale *to* (a slope below 0, from noise, counts as 0)."""
    slope = max(0.0, (t2 - t1) / (s2 - s1))
    return t1 + slope * (to - s1)


def simulate(durations: dict[str, float], jobs: int, deps: dict | None = None, priority: tuple | None = None) -> dict:
    """Lay *durations* (seconds per task) out on *jobs* lanes as ``train_toy.py`` does: whenever a lane is
    free it takes the first task of ``PRIORITY`` whose dependencies (``TASK_DEPS``, among the tasks given) have
    finished. Returns the wall time and each task's (start, end)."""
    from toyworld.train import PRIORITY, TASK_DEPS

    deps = TASK_DEPS if deps is None else deps
    priority = PRIORITY if priority is None else priority
    pending = [t for t in priority if t in durations]
    running: dict[str, float] = {}  # task -> end time
    done: set[str] = set()
    spans: dict[str, tuple[float, float]] = {}
    now = 0.0
    while pending or running:
        ready = [t for t in pending if all(d in done or d not in durations for d in deps[t])]
        while ready and len(running) < jobs:
            task = ready.pop(0)
            pending.remove(task)
            running[task] = now + durations[task]
            spans[task] = (now, running[task])
        if not running:  # pragma: no cover - TASK_DEPS has no cycle
            raise ValueError(f"tasks {pending} wait on each other")
        now = min(running.values())
        for task in [t for t, end in running.items() if end == now]:
            del running[task]
            done.add(task)
    return {"wall_seconds": now, "spans": spans}


def longest_chain(durations: dict[str, float], deps: dict | None = None) -> tuple[float, list[str]]:
    """The longest run of tasks that must follow each other (seconds, the tasks in order)."""
    from toyworld.train import TASK_DEPS

    deps = TASK_DEPS if deps is None else deps
    best: dict[str, tuple[float, list[str]]] = {}

    def chain(task: str) -> tuple[float, list[str]]:
        if task not in best:
            before = max((chain(d) for d in deps[task] if d in durations), default=(0.0, []))
            best[task] = (before[0] + durations[task], before[1] + [task])
        return best[task]

    return max((chain(t) for t in durations), default=(0.0, []))


def short_run(scale: float, jobs: int, threads: int, folder: Path, log: Path) -> dict[str, float]:
    """``scripts/train_toy.py --steps-scale scale`` into *folder*; each task's wall seconds."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train_toy.py"), "--out", str(folder), "--steps-scale", str(scale),
           "--jobs", str(jobs), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"retrain_time.py: the short run at scale {scale} failed (exit {rc}); its output is in {log}")
    runs = json.loads((folder / "training_metrics.json").read_text())["runs"]
    return {task: r["wall_seconds"] for task, r in runs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="where to write the prediction (not overwritten)")
    p.add_argument("--scales", type=float, nargs=2, default=(0.01, 0.03), metavar=("S1", "S2"),
                   help="the two --steps-scale values of the short runs (default 0.01 0.03)")
    p.add_argument("--jobs", type=int, default=2, help="lanes, as train_toy.py's --jobs (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per lane, as train_toy.py's (default 1)")
    p.add_argument("--target", type=float, default=2.5, metavar="HOURS",
                   help="the wall time a full retrain should stay under (default 2.5, issue 29)")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="keep the short runs' folders and logs in DIR (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    s1, s2 = args.scales
    if not 0 < s1 < s2 < 1:
        p.error(f"--scales {s1} {s2}: give two scales with 0 < S1 < S2 < 1, e.g. --scales 0.01 0.03")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads take at least 1")
    if args.json.exists():
        p.error(f"{args.json} exists; give another --json path (results are never overwritten)")
    import torch

    from toyworld.train import _cpu_name

    keep = args.keep
    scratch = Path(tempfile.mkdtemp(prefix="retrain-time-")) if keep is None else keep
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    measured = {}
    for s in (s1, s2):
        print(f"short run at --steps-scale {s} ({args.jobs} jobs) ...", flush=True)
        measured[s] = short_run(s, args.jobs, args.threads, scratch / f"scale-{s:g}", scratch / f"scale-{s:g}.log")
    tasks = [t for t in measured[s1] if t in measured[s2]]
    predicted = {t: extrapolate(s1, measured[s1][t], s2, measured[s2][t]) for t in tasks}
    plan = simulate(predicted, args.jobs)
    chain_s, chain = longest_chain(predicted)
    work = sum(predicted.values())
    report = {
        "benchmark": "retrain_time.py", "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "jobs": args.jobs, "threads": args.threads, "scales": [s1, s2],
        "tasks": {t: {f"seconds_at_{s1:g}": measured[s1][t], f"seconds_at_{s2:g}": measured[s2][t],
                      "predicted_seconds": predicted[t], "predicted_start": plan["spans"][t][0]} for t in tasks},
        "predicted_wall_seconds": plan["wall_seconds"], "predicted_work_seconds": work,
        "longest_chain": chain, "longest_chain_seconds": chain_s, "target_seconds": args.target * 3600,
        "within_target": plan["wall_seconds"] <= args.target * 3600, "benchmark_seconds": time.perf_counter() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n| task | {s1:g} | {s2:g} | predicted at 1 |\n| --- | --- | --- | --- |")
    for t in sorted(tasks, key=lambda t: -predicted[t]):
        print(f"| {t} | {measured[s1][t]:.0f} s | {measured[s2][t]:.0f} s | {predicted[t]:.0f} s ({predicted[t] / 3600:.2f} h) |")
    print(f"\none-thread work {work / 3600:.2f} h; longest chain {' -> '.join(chain)} {chain_s / 3600:.2f} h; "
          f"predicted wall time on {args.jobs} lanes {plan['wall_seconds'] / 3600:.2f} h "
          f"(target {args.target:g} h: {'within' if report['within_target'] else 'over'}); written to {args.json}")
    if keep is None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
