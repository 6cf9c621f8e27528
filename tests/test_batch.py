"""Batch generation (generators/runs/batch.py): prompts file x seeds, the index, skipping finished runs, failing
rows, exports, bad input, and two accelerate processes equal to one."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generators import cli
from generators.runs.batch import INDEX, parse_seeds, read_index, read_prompts
from generators.runs import generate

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate.py"
TOY = ["--preset", "toy", "--iterations", "2", "--no-progress"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())


def _images(out: Path) -> dict[tuple[str, int], torch.Tensor]:
    entries = [json.loads(line) for line in (out / INDEX).read_text().splitlines()]
    return {(e["prompt"], e["seed"]): _pixels(out / e["images"][0]) for e in entries if e["status"] == "ok"}


def test_seed_lists_and_ranges():
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("0,2,5") == [0, 2, 5] and parse_seeds("7") == [7]
    assert parse_seeds("1-2,9") == [1, 2, 9]
    for bad, message in (("3-1", "backwards"), ("a", "not a seed list"), ("1,1", "twice"), ("0-x", "not a seed")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)


def test_prompt_files_give_rows_with_their_own_seeds_and_options(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('Prompts,Seeds,backend,lr,Category\n"a cat, sitting",0-1,pixels,0.5,animals\na dog,,,,\n')
    cat, dog = read_prompts(csv_file)
    assert (cat.index, cat.prompt, cat.seeds, cat.options) == (0, "a cat, sitting", [0, 1],
                                                               {"backend": "pixels", "learning_rate": "0.5"})
    assert (dog.prompt, dog.seeds, dog.options, dog.record["Category"]) == ("a dog", None, {}, "")
    tsv = tmp_path / "parti.tsv"
    tsv.write_text("Prompt\tCategory\nbread\tFood\n")
    assert [r.prompt for r in read_prompts(tsv)] == ["bread"]
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "seed": 7, "include": [{"class": "circle"}]}\n\n{"prompt": "x"}\n')
    first, second = read_prompts(jsonl)
    assert first.seeds == [7] and first.record["include"] == [{"class": "circle"}] and second.index == 1
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  a green cross  \n")
    assert [(r.index, r.prompt) for r in read_prompts(text)] == [(0, "a red circle"), (1, "a green cross")]
    array = tmp_path / "p.json"
    array.write_text('["a red circle", {"prompt": "a blue square", "iterations": 3}]')
    assert [(r.prompt, r.options) for r in read_prompts(array)] == [("a red circle", {}),
                                                                    ("a blue square", {"iterations": 3})]


def test_batch_skips_finished_runs_and_records_a_failing_row(tmp_path, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,lr,note\na red circle,,x\na green cross,0.2,\nnot a good row,-1,\n"
                       "a blue square,,\n")
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "--prompts-file", prompts, "--seeds", "0-1", "--out", out, *TOY)
    assert code == 1                                                 # a row failed; the others finished
    assert "row 2 seed 0: ValueError: option --lr (from prompts.csv row 2) is -1.0; it must be greater than 0" in err
    assert "6 of 8 run(s) done (0 skipped as finished, 6 new), 2 failed" in stdout
    assert "column(s) note are not options; used only in --export geneval" in err
    entries = [json.loads(line) for line in (out / INDEX).read_text().splitlines()]
    assert [(e["row"], e["seed"], e["status"]) for e in entries] == [
        (0, 0, "ok"), (0, 1, "ok"), (1, 0, "ok"), (1, 1, "ok"), (2, 0, "error"), (2, 1, "error"), (3, 0, "ok"),
        (3, 1, "ok")]
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 6 and all(len(list(p.glob("00000-*.png"))) == 1 and (p / "run.json").is_file() for p in folders)
    for e in entries:
        if e["status"] == "ok":
            meta = json.loads((out / e["folder"] / "run.json").read_text())
            assert (meta["prompt"], meta["seed"]) == (e["prompt"], e["seed"]) and e["score"] == meta["clip_score"]
    green = json.loads((out / entries[3]["folder"] / "run.json").read_text())
    assert green["settings"]["learning_rate"] == 0.2                # a row's own option
    # each run is the Python API's run for that prompt and seed
    single = generate("a green cross", preset="toy", iterations=2, seed=1, learning_rate=0.2, save=False,
                      progress=False)
    assert torch.equal(_pixels(out / entries[3]["images"][0]), _pixels_of(single))
    index_before = (out / INDEX).read_text()

    code, stdout, err = _cli(capsys, "--prompts-file", prompts, "--seeds", "0-1", "--out", out, *TOY)
    assert code == 1 and "6 already done (skipped), 2 to do" in err
    assert "6 of 8 run(s) done (6 skipped as finished, 0 new), 2 failed" in stdout
    assert len([p for p in out.iterdir() if p.is_dir()]) == 6       # nothing redone
    again = [json.loads(line) for line in (out / INDEX).read_text().splitlines()]
    assert again[:4] == [json.loads(line) for line in index_before.splitlines()][:4]
    assert not list(out.glob("runs.rank-*.jsonl"))                  # the shard was merged


def _pixels_of(run) -> torch.Tensor:
    return run.images[0].mul(255).round().to(torch.uint8).permute(1, 2, 0)


def test_unfinished_jobs_are_redone_and_interrupted_ones_resume(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    assert _cli(capsys, "--prompts-file", prompts, "--seeds", "3", "--out", out, *TOY, "--iterations", "4")[0] == 0
    first = {(e["row"], e["seed"]): e for e in read_index(out).values()}
    # a crash left row 1 half done: its index line says interrupted, and its folder has a checkpoint
    stopped = generate("a blue square", preset="toy", iterations=4, seed=3, out=str(out), progress=False,
                       callback=lambda info: info.step < 1)
    entry = {**first[(1, 3)], "status": "interrupted", "folder": stopped.path.name,
             "images": [f"{stopped.path.name}/{stopped.image_path.name}"], "time": first[(1, 3)]["time"] + 0.001}
    (out / "runs.rank-1.jsonl").write_text(json.dumps(entry) + "\n")     # a shard a dead process left behind
    code, stdout, err = _cli(capsys, "--prompts-file", prompts, "--seeds", "3", "--out", out, *TOY,
                             "--iterations", "4")
    assert code == 0 and "1 already done (skipped), 1 to do" in err
    latest = read_index(out)
    assert latest[(1, 3)]["status"] == "ok" and latest[(1, 3)]["resumed_from"] == stopped.path.name
    assert torch.equal(_pixels(out / latest[(1, 3)]["images"][0]), _pixels(out / first[(1, 3)]["images"][0]))


def test_exports_geneval_and_flat(tmp_path, capsys):
    prompts = tmp_path / "geneval.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"},
            {"tag": "colors", "include": [{"class": "cross", "count": 1, "color": "green"}], "prompt": "a green cross"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code, stdout, _ = _cli(capsys, "--prompts-file", prompts, "--seeds", "0,4", "--out", out, "--export", "geneval",
                           *TOY)
    assert code == 0 and f"exported to {tmp_path / 'out-geneval'}" in stdout
    images = _images(out)
    for i, row in enumerate(rows):
        folder = tmp_path / "out-geneval" / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert torch.equal(_pixels(folder / "samples" / "0001.png"), images[(row["prompt"], 4)])
    flat = tmp_path / "flat"
    code, _, err = _cli(capsys, "--prompts-file", prompts, "--seeds", "0,4", "--out", out, "--export", "flat",
                        "--export-dir", flat, *TOY)
    assert code == 0 and "4 already done (skipped)" in err
    with open(flat / "captions.csv", newline="") as fh:
        captions = list(csv.DictReader(fh))
    assert [(c["image"], c["prompt"]) for c in captions] == [
        ("00000-0000.png", "a red circle"), ("00000-0001.png", "a red circle"), ("00001-0000.png", "a green cross"),
        ("00001-0001.png", "a green cross")]
    from guidance.evaluation.pairs import collect_items

    items, _ = collect_items(flat, pairs=flat / "captions.csv")         # what scripts/evaluate.py reads
    assert [(it.key, it.error) for it in items] == [((c["image"], c["prompt"]), None) for c in captions]
    assert torch.equal(_pixels(flat / "00001-0000.png"), images[("a green cross", 0)])
    # exporting again adds nothing and changes nothing; a different image in the way is refused
    (flat / "00000-0000.png").write_bytes((flat / "00000-0001.png").read_bytes())
    code, _, err = _cli(capsys, "--prompts-file", prompts, "--seeds", "0,4", "--out", out, "--export", "flat",
                        "--export-dir", flat, *TOY)
    assert code == 2 and "exists with a different image; nothing overwritten" in err


def test_bad_batch_input_is_a_one_line_error_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    empty, headless, text = tmp_path / "empty.txt", tmp_path / "no-prompt.csv", tmp_path / "p.txt"
    empty.write_text("\n  \n")
    headless.write_text("caption_text,seed\na cat,1\n")
    text.write_text("a cat\n")
    cases = [(("--prompts-file", tmp_path / "missing.txt"), "does not exist"),
             (("--prompts-file", empty), "has no prompts"),
             (("--prompts-file", headless), "has no prompt column"),
             (("--prompts-file", text, "--seeds", "5-2"), "runs backwards"),
             (("--prompts-file", text, "--seeds", "1", "--seed", "2"), "not both"),
             (("--prompts-file", text, "a dog"), "not both"),
             (("--prompts-file", text, "--iterations", "-3"), "iterations"),
             (("--export", "flat", "a dog"), "go(es) with --prompts-file")]
    for argv, message in cases:
        code, _, err = _cli(capsys, *argv, "--out", out, "--preset", "toy")
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err)
    assert not out.exists()
    with pytest.raises(ValueError, match="line 2 has more cells"):
        (tmp_path / "bad.csv").write_text("prompt\na cat,a dog\n")
        read_prompts(tmp_path / "bad.csv")


@pytest.mark.slow  # two fresh Python processes importing torch + transformers: ~30 s on 2 busy CPU cores
def test_two_accelerate_processes_equal_one(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na green cross\na blue square\n")
    assert _cli(capsys, "--prompts-file", prompts, "--seeds", "0-1", "--out", tmp_path / "one", *TOY)[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           str(SCRIPT), "--prompts-file", str(prompts), "--seeds", "0-1", "--out", str(tmp_path / "two"),
           "--device", "cpu", *TOY]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes" in proc.stderr and proc.stdout.count("6 of 6 run(s) done") == 1   # main reports
    one, two = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert len(one) == 6 and one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not list((tmp_path / "two").glob("runs.rank-*.jsonl"))
