"""scripts/evaluate.py and guidance.evaluation: run folders, pairs files, bad inputs, resume, summary,
several models, and multi-process (accelerate) runs equal to one process."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from guidance.evaluation.pairs import caption_of
from guidance.evaluation.report import describe, t_quantile
from guidance.score import ScoreModel, clip_score
from tiny import save_tiny_clip

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "evaluate.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("clipsteer_evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_script = _load_script()


@pytest.fixture(scope="module")
def clip_a(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "a", seed=0, image_size=32))


@pytest.fixture(scope="module")
def clip_b(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "b", seed=1, image_size=32))


def _png(path: Path, seed: int, size=(40, 36)) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _run_folder(root: Path, name: str, prompt: str, seed: int, n_images: int = 1) -> Path:
    """A run folder as generators.runs writes it: PNGs + run.json with prompt/image/images/seed/backend."""
    folder = root / name
    names = ["image.png"] if n_images == 1 else [f"image-{i}.png" for i in range(n_images)]
    for i, n in enumerate(names):
        _png(folder / n, seed * 10 + i)
    (folder / "run.json").write_text(json.dumps({
        "prompt": prompt, "seed": seed, "backend": "vqgan", "clip_score": 0.0, "image": names[0],
        "images": names, "settings": {"steps": 3}}))
    return folder


def _runs(root: Path) -> Path:
    _run_folder(root, "r0", "a red circle", 0)
    _run_folder(root, "r1", "a blue square", 1)
    _run_folder(root, "r2", "a red circle:1.5|blurry:-1", 2, n_images=2)
    _run_folder(root, "r3", "a blue square", 3)
    return root


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _main(*args) -> int:
    return evaluate_script.main([str(a) for a in args] + ["--no-progress"])


def test_run_folders_scored_like_clip_score(tmp_path, clip_a, capsys):
    root = _runs(tmp_path / "outputs")
    assert _main(root, "--model", clip_a) == 0
    rows = _read_csv(root / "clip_scores.csv")
    doc = json.loads((root / "clip_scores.json").read_text())
    assert [r["image"] for r in rows] == ["r0/image.png", "r1/image.png", "r2/image-0.png", "r2/image-1.png",
                                          "r3/image.png"]
    assert [r["prompt"] for r in rows][2:4] == ["a red circle", "a red circle"]  # weights dropped
    assert [r["seed"] for r in rows] == ["0", "1", "2", "2", "3"]
    model = ScoreModel.load(clip_a)
    for r in rows:
        expected = float(clip_score(root / r["image"], r["prompt"], model=model))
        raw = float(clip_score(root / r["image"], r["prompt"], model=model, reduction="none")[0])
        assert float(r["score"]) == pytest.approx(raw, abs=1e-4)
        assert expected == pytest.approx(max(raw, 0.0), abs=1e-4)
        assert r["status"] == "ok" and r["definition"] == "torchmetrics"
    assert doc["rows"][0]["score"] == pytest.approx(float(rows[0]["score"]))

    # summary: n, mean (torchmetrics clamps the mean), sample std, Student-t 95% CI, per prompt and overall
    red = [float(r["score"]) for r in rows if r["prompt"] == "a red circle"]
    line = next(s for s in doc["summary"] if s["prompt"] == "a red circle")
    assert line["n"] == 3
    assert line["mean"] == pytest.approx(max(statistics.fmean(red), 0), abs=1e-6)
    assert line["std"] == pytest.approx(statistics.stdev(red), abs=1e-6)
    half = 4.302652729911275 * statistics.stdev(red) / math.sqrt(3)
    assert line["ci_high"] == pytest.approx(max(statistics.fmean(red) + half, 0), abs=1e-6)
    overall = next(s for s in doc["summary"] if s["prompt"] == "(all)")
    assert overall["n"] == 5 and overall["errors"] == 0
    out = capsys.readouterr().out
    assert "a blue square" in out and "(all)" in out and "95% CI" in out


def test_bad_files_are_listed_and_the_rest_scored(tmp_path, clip_a, capsys):
    root = _runs(tmp_path / "outputs")
    (root / "r1" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "r3" / "image.png").unlink()
    (tmp_path / "outputs" / "broken").mkdir()
    (root / "broken" / "run.json").write_text("{not json")
    (root / "noimage").mkdir()
    (root / "noimage" / "run.json").write_text(json.dumps({"prompt": "a cat"}))
    assert _main(root, "--model", clip_a, "--json", tmp_path / "t.json") == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    status = {r["image"]: (r["status"], r["error"]) for r in doc["rows"]}
    assert status["r0/image.png"][0] == "ok" and status["r2/image-1.png"][0] == "ok"
    assert "not a readable image" in status["r1/image.png"][1]
    assert "does not exist" in status["r3/image.png"][1]
    assert "not valid JSON" in status["broken/run.json"][1]
    assert "no 'image' key" in status["noimage/run.json"][1]
    assert len(doc["errors"]) == 4
    out = capsys.readouterr().out
    assert "not scored (4)" in out and "r3/image.png" in out
    assert next(s for s in doc["summary"] if s["prompt"] == "(all)")["errors"] == 4
    assert _main(root, "--model", clip_a, "--json", tmp_path / "t.json", "--strict") == 1


def test_resume_keeps_scored_rows_and_scores_only_new_images(tmp_path, clip_a):
    root = _runs(tmp_path / "outputs")
    out_json, out_csv = tmp_path / "scores.json", tmp_path / "scores.csv"
    assert _main(root, "--model", clip_a, "--json", out_json, "--csv", out_csv) == 0
    doc = json.loads(out_json.read_text())
    first = doc["rows"][0]["score"]
    doc["rows"][0]["score"] = 12345.0  # a marker: a skipped row keeps it, a re-scored row loses it
    out_json.write_text(json.dumps(doc))
    _run_folder(root, "r4", "a green cross", 4)
    assert _main(root, "--model", clip_a, "--json", out_json, "--csv", out_csv) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 6 and rows[0]["score"] == 12345.0
    assert rows[-1]["image"] == "r4/image.png" and rows[-1]["status"] == "ok"
    assert float(_read_csv(out_csv)[0]["score"]) == 12345.0

    # another definition adds its own rows and keeps the others
    assert _main(root, "--model", clip_a, "--json", out_json, "--definition", "hessel") == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 12 and {r["definition"] for r in rows} == {"torchmetrics", "hessel"}
    hessel = {r["image"]: r["score"] for r in rows if r["definition"] == "hessel"}
    tm = {r["image"]: r["score"] for r in rows if r["definition"] == "torchmetrics"}
    assert hessel["r1/image.png"] == pytest.approx(2.5 * max(tm["r1/image.png"], 0) / 100, abs=1e-5)

    assert _main(root, "--model", clip_a, "--json", out_json, "--overwrite") == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 6 and rows[0]["score"] == pytest.approx(first, abs=1e-6)


def test_pairs_csv_and_jsonl_with_bad_rows(tmp_path, clip_a):
    folder = tmp_path / "imgs"
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png", "sub/e.png"]):
        _png(folder / name, 100 + i)
    (folder / "corrupt.png").write_bytes(b"GIF89a nope")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('image,prompt\na.png,"a red circle, large"\nb.png,\nc.png,a cat,extra\n'
                     "missing.png,a dog\ncorrupt.png,a dog\nsub/e.png,a blue square\n")
    assert _main(folder, "--pairs", pairs, "--model", clip_a, "--csv", tmp_path / "p.csv") == 0
    rows = {r["image"]: r for r in _read_csv(tmp_path / "p.csv")}
    assert rows["a.png"]["status"] == "ok" and rows["a.png"]["prompt"] == "a red circle, large"
    assert rows["sub/e.png"]["status"] == "ok"
    assert "no prompt" in rows["b.png"]["error"]
    assert "columns" in next(r["error"] for k, r in rows.items() if "line 4" in k)
    assert "does not exist" in rows["missing.png"]["error"]
    assert "not a readable image" in rows["corrupt.png"]["error"]
    assert "no row in pairs.csv" in rows["d.png"]["error"]
    assert "no row" in rows["c.png"]["error"]  # its only row was malformed
    assert float(rows["a.png"]["score"]) == pytest.approx(
        float(clip_score(folder / "a.png", "a red circle, large", model=ScoreModel.load(clip_a),
                         reduction="none")[0]), abs=1e-4)

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "a.png", "prompt": "a red circle"}\n{bad json\n{"image": "d.png"}\n')
    assert _main(folder, "--pairs", jsonl, "--model", clip_a, "--json", tmp_path / "j.json") == 0
    rows = json.loads((tmp_path / "j.json").read_text())["rows"]
    by = {r["image"]: r for r in rows}
    assert by["a.png"]["status"] == "ok"
    assert any("not valid JSON" in r["error"] for r in rows)
    assert "no prompt" in by["d.png"]["error"]

    array = tmp_path / "pairs.json"  # a JSON array works too; a prompt may hold commas and quotes
    array.write_text(json.dumps([{"image": "a.png", "prompt": 'a "red" circle, big'}, {"image": "sub/e.png",
                                                                                     "caption": "a square"}]))
    assert _main(folder, "--pairs", array, "--model", clip_a, "--csv", tmp_path / "a.csv") == 0
    by = {r["image"]: r for r in _read_csv(tmp_path / "a.csv")}
    assert by["a.png"]["prompt"] == 'a "red" circle, big' and by["sub/e.png"]["status"] == "ok"


def test_single_image_and_folder_with_one_prompt(tmp_path, clip_a, capsys):
    img = _png(tmp_path / "one" / "fox.png", 7)
    assert _main(img, "--prompt", "a red fox", "--model", clip_a) == 0
    out = capsys.readouterr().out
    expected = float(clip_score(img, "a red fox", model=ScoreModel.load(clip_a)))
    assert f"{expected:.4f}" in out
    assert not (tmp_path / "one" / "clip_scores.json").exists()  # a single image writes only when asked
    _png(tmp_path / "one" / "more" / "cat.png", 8)
    assert _main(tmp_path / "one", "--prompt", "a red fox", "--model", clip_a) == 0
    rows = _read_csv(tmp_path / "one" / "clip_scores.csv")
    assert [r["image"] for r in rows] == ["fox.png", "more/cat.png"]


def test_two_models_in_one_pass(tmp_path, clip_a, clip_b):
    root = _runs(tmp_path / "outputs")
    assert _main(root, "--models", clip_a, clip_b, "--csv", tmp_path / "m.csv") == 0
    rows = _read_csv(tmp_path / "m.csv")
    assert [r["model"] for r in rows] == [clip_a] * 5 + [clip_b] * 5
    a = [float(r["score"]) for r in rows[:5]]
    b = [float(r["score"]) for r in rows[5:]]
    assert a != pytest.approx(b, abs=1e-3)


def test_usage_errors_are_one_line_and_nothing_is_overwritten(tmp_path, clip_a, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _main(empty, "--model", clip_a) == 2
    assert "no run.json" in capsys.readouterr().err
    assert _main(empty, "--prompt", "a cat", "--model", clip_a) == 2
    assert "has no images" in capsys.readouterr().err
    assert _main(tmp_path / "nope", "--model", clip_a) == 2
    assert "does not exist" in capsys.readouterr().err
    root = _runs(tmp_path / "outputs")
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"my": "notes"}')
    assert _main(root, "--model", clip_a, "--json", foreign) == 2
    assert "--overwrite" in capsys.readouterr().err and foreign.read_text() == '{"my": "notes"}'
    bad_pairs = tmp_path / "bad.csv"
    bad_pairs.write_text("file,text\na.png,cat\n")
    assert _main(root, "--pairs", bad_pairs, "--model", clip_a) == 2
    assert "'image' and 'prompt' columns" in capsys.readouterr().err
    assert _main(root, "--model", clip_a, "--definition", "hessel", "--batch-size", "0") == 2
    assert "batch size" in capsys.readouterr().err


def test_statistics_helpers():
    # two-sided 95% Student-t critical values (standard tables)
    for df, t in [(1, 12.706204736), (2, 4.302652730), (5, 2.570581836), (10, 2.228138852), (30, 2.042272456),
                  (101, 1.983731003), (100000, 1.959986)]:
        assert t_quantile(0.95, df) == pytest.approx(t, abs=2e-6)
    d = describe([-3.0, -1.0], "torchmetrics")
    assert d["mean"] == 0.0 and d["ci_low"] == 0.0 and d["std"] == pytest.approx(math.sqrt(2))
    d = describe([-3.0, -1.0], "per_pair")
    assert d["mean"] == pytest.approx(-2.0) and d["ci_low"] < -2.0
    assert describe([5.0])["std"] is None
    assert caption_of("a red fox:1.5|snowy forest:0.5|blurry:-1") == "a red fox, snowy forest"
    assert caption_of("photo: a dog") == "photo: a dog"


@pytest.mark.slow  # two fresh Python processes importing torch + transformers: ~35 s on 2 CPU cores
def test_two_processes_equal_one(tmp_path, clip_a):
    """`torchrun`/`accelerate launch --multi_gpu` on CPU: work split by accelerate, gathered, main writes."""
    root = _runs(tmp_path / "outputs")
    for i in range(5, 9):
        _run_folder(root, f"r{i}", ["a red circle", "a green cross"][i % 2], i)
    (root / "r6" / "image.png").write_bytes(b"corrupt")
    assert _main(root, "--model", clip_a, "--batch-size", "3", "--csv", tmp_path / "single.csv") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(SCRIPT), str(root), "--model", clip_a, "--batch-size", "3", "--csv", str(tmp_path / "multi.csv"),
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("(all)") == 1  # only the main process prints and writes
    single, multi = _read_csv(tmp_path / "single.csv"), _read_csv(tmp_path / "multi.csv")
    assert [(r["image"], r["status"], r["error"]) for r in single] == [(r["image"], r["status"], r["error"])
                                                                        for r in multi]
    for a, b in zip(single, multi):
        if a["status"] == "ok":
            assert float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-4)
