"""benchmarks/quality.py (the package benchmarks/toy_quality): prompt sample, the benchmark loop on tiny models, targets, and the CLI on the toy models."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from benchmarks import toy_quality as quality   # the package behind benchmarks/quality.py
from tiny import save_tiny_clip, save_tiny_sd, save_tiny_vqgan

ROOT = Path(__file__).resolve().parent.parent




def test_benchmark_prompts_are_the_world_prompt_sets():
    from toyworld.prompts import CATEGORIES, prompt_set

    bench = quality.benchmark_prompts("benchmark", 4)
    assert bench == prompt_set("benchmark", 4) and [p.category for p in bench] == [c for c in CATEGORIES for _ in range(4)]
    tuning = quality.benchmark_prompts("tuning", 4, ["position"])
    assert [p.category for p in tuning] == ["position"] * 4 and not {p.text for p in tuning} & {p.text for p in bench}
    with pytest.raises(ValueError, match="--per-category is 0"):
        quality.benchmark_prompts("benchmark", 0)
    with pytest.raises(ValueError, match="unknown categories"):
        quality.benchmark_prompts("benchmark", 1, ["colours"])


def _rows(variant, per_category):
    """Rows with the given number of right images out of 4 per category."""
    from toyworld.prompts import CATEGORIES

    return [{"variant": variant, "category": c, "correct": i < per_category[k], "clip_score": 60.0, "seconds": 2.0,
             "generate_s": 1.5, "load_s": 0.5, "settings": {}}
            for k, c in enumerate(CATEGORIES) for i in range(4)]


def test_summary_targets_and_lifts():
    rows = _rows("sd", [4, 2, 1, 1, 0]) + _rows("sd+clip", [4, 4, 4, 3, 4])
    s = quality.summarise(rows)
    assert s["sd"]["categories"]["two_object"] == {"n": 4, "right": 2, "accuracy": 0.5,
                                                   "ci95": [round(x, 4) for x in quality.wilson_interval(2, 4)]}
    assert s["sd"]["overall"] == pytest.approx((1 + 0.5 + 0.25 + 0.25 + 0) / 5)
    low, high = s["sd"]["overall_ci95"]
    assert 0 < low < s["sd"]["overall"] < high < 1 and s["sd"]["seconds_per_image"] == 2.0
    assert quality.lifts(s) == {"sd+clip": {"single": 0.0, "two_object": 50.0, "counting": 75.0, "colour_attr": 50.0,
                                            "position": 100.0}}
    t = quality.check_targets(s)
    assert t[0]["met"] is True and t[0]["measured"].startswith("sd+clip: overall 95.0%, weakest colour_attr 75.0%")
    t = quality.check_targets(quality.summarise(_rows("sd+clip", [4, 4, 4, 2, 4])))
    assert t[0]["met"] is False  # overall 90% but colour_attr at 50%
    assert quality.check_targets({})[0]["met"] is None
    table = quality.format_table(s)
    assert "SD + CLIP guidance" in table and "counting" in table and "95.0%" in table


@pytest.mark.filterwarnings("ignore:ignoring option")  # one options dict for both backends' models
def test_benchmark_loop_on_tiny_models(tmp_path):
    """Every variant runs through generate(), is judged by the rule and scored; seeds reproduce; the summary
    matches the rows."""
    clip = save_tiny_clip(tmp_path / "clip", seed=0, image_size=32)
    options = dict(clip=[str(clip)], vqgan=str(save_tiny_vqgan(tmp_path / "vqgan", fmt="safetensors")),
                   sd_model=str(save_tiny_sd(tmp_path / "sd")), size=(32, 32), cutouts=2, min_fraction=0.6,
                   augmentations=["none"], scheduler="ddim", precision="fp32")   # fp32, as the toy preset
    judge_clip = quality.load_judge_clip(save_tiny_clip(tmp_path / "judge", seed=1, image_size=32), device="cpu")
    prompts = quality.benchmark_prompts("tuning", 1, ["position"])
    seen = []
    variants = [v for v in quality.VARIANTS if "itm" not in v.models]   # the toy ITM reward: tests/test_rewards.py
    result = quality.run_benchmark(prompts, [5], variants, preset=None, options=options,
                                   judge_clip=judge_clip, iterations=3, steps=2, clip_guidance_scale=50.0,
                                   device="cpu", on_row=seen.append, log=lambda s: None)
    rows = result["rows"]
    assert not result["interrupted"] and rows == seen
    assert [r["variant"] for r in rows] == [v.name for v in variants]
    from toyworld.world import COLOURS, SHAPES

    for r in rows:
        assert r["prompt"] == prompts[0].text and r["seed"] == 5 and r["category"] == "position"
        assert r["found"]["background"] in COLOURS
        assert all(o[0] in COLOURS and o[1] in SHAPES and len(o[2]) == 4 for o in r["found"]["objects"])
        assert isinstance(r["correct"], bool)
        assert math.isfinite(r["clip_score"]) and r["clip_score"] != 0.0
        assert r["seconds"] > 0 and r["generate_s"] is not None
    assert rows[0]["steps_done"] == 3 and rows[0]["settings"]["iterations"] == 3
    assert rows[1]["settings"]["clip_guidance_scale"] == 0.0 and rows[1]["settings"]["steps"] == 2
    assert rows[2]["settings"]["clip_guidance_scale"] == 50.0
    assert rows[2]["first_loss"] is not None  # guided steps record the CLIP loss
    # the @bf16 rows (issue 35) are their fp32 rows run in bf16, and each row records the precision it ran in
    precision = {r["variant"]: r["precision"] for r in rows}
    assert {n for n, p in precision.items() if p == "bfloat16"} == {f"{n}@bf16" for n in quality.BF16_OF}
    assert {p for n, p in precision.items() if not n.endswith("@bf16")} == {"float32"}
    by_name = {v.name: v for v in quality.VARIANTS}
    for name in quality.BF16_OF:
        fp32, bf16 = by_name[name], by_name[f"{name}@bf16"]
        assert bf16.options == {**fp32.options, "precision": "bf16"} and (bf16.backend, bf16.models) == (fp32.backend, fp32.models)
        assert quality.variant_options(bf16, iterations=3, steps=2, clip_guidance_scale=None)["precision"] == "bf16"
    # Same seed, same image: the row (reading and score) repeats exactly.
    again = quality.run_benchmark(prompts, [5], quality.VARIANTS[:1], preset=None, options=options,
                                  judge_clip=judge_clip, iterations=3, device="cpu", log=lambda s: None)["rows"][0]
    assert again["found"] == rows[0]["found"] and again["clip_score"] == rows[0]["clip_score"]
    summary = quality.summarise(rows)
    for r in rows:
        s = summary[r["variant"]]
        assert s["n"] == 1 and s["clip_score"] == pytest.approx(r["clip_score"], abs=1e-3)
        assert s["categories"]["position"]["accuracy"] == float(r["correct"]) == s["overall"]


def test_reference_scenes_are_judged_right():
    ref = quality.reference_scores(quality.benchmark_prompts("benchmark", 4), None)
    assert ref["scores"]["overall"] == 1.0 and ref["n"] == 20


def test_cli_on_the_toy_models(tmp_path, capsys):
    """The command line on the committed toy models, both pictures written. An existing JSON is never
    overwritten without --overwrite."""
    missing = quality.missing_toy_models(["clip_a", "clip_b", "clip_c", "clip_d", "vqgan", "sd"])
    if missing:
        pytest.skip(f"toy weights not trained yet: {', '.join(missing)}")
    out = tmp_path / "q.json"
    argv = ["--quick", "--categories", "single", "--variants", "vqgan+clip", "sd", "--iterations", "2", "--steps", "2",
            "--device", "cpu", "--json", str(out), "--figure", str(tmp_path / "q.png"), "--bars", str(tmp_path / "b.png")]
    assert quality.main(argv) == 0
    report = json.loads(out.read_text())
    captured = capsys.readouterr()
    assert report["complete"] and report["seeds"] == [0] and len(report["prompts"]) == 1
    assert report["prompt_set"] == "benchmark"
    assert "VQGAN+CLIP" in captured.out and "Targets:" in captured.out
    assert (tmp_path / "q.png").is_file() and (tmp_path / "b.png").is_file()
    assert {r["variant"] for r in report["rows"]} == {"vqgan+clip", "sd"}
    assert report["rows"][0]["steps_done"] == 2 and report["rows"][0]["clip_score"] is not None
    assert report["summary"]["vqgan+clip"]["n"] == 1 and len(report["targets"]) == 1
    before = out.read_text()
    assert quality.main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == before
    tuning = quality.parse_args(["--prompt-set", "tuning"])
    assert tuning.seed_base == 100 and quality.parse_args([]).seed_base == 0


def _load_figures():
    spec = importlib.util.spec_from_file_location("clipsteer_make_figures", ROOT / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_figure_drawing_helpers():
    """scripts/make_figures.py: ticks cover the data; the loss plot draws the curve; grid cells land in place."""
    from PIL import Image
    import numpy as np

    figures = _load_figures()
    ticks = figures.nice_ticks(0.43, 1.41)
    assert ticks[0] <= 0.43 and ticks[-1] >= 1.41 and len(ticks) <= 7
    assert np.allclose(np.diff(ticks), ticks[1] - ticks[0])
    fig = figures.loss_figure([1.4, 1.0, None, 0.6, 0.5], title="loss")
    assert fig.size == (640, 380)
    blue = (np.asarray(fig) == (40, 80, 200)).all(-1)
    assert blue.sum() > 100  # the curve is drawn
    with pytest.raises(ValueError, match="no finite losses"):
        figures.loss_figure([None, None], title="loss")
    red = Image.new("RGB", (64, 64), (220, 40, 40))
    cells = {(0, 0): {"image": red, "verdict": "red circle / blue", "all_right": True, "score": "clip_b 50.0"}}
    one = figures.grid_figure(cells, ["VQGAN+CLIP"], ["a red circle on a blue background", "x"], note="n")
    two = figures.grid_figure(cells, ["VQGAN+CLIP", "SD"], ["a red circle on a blue background", "x"], note="n")
    assert two.width == one.width and two.height > one.height
    assert (np.asarray(one) == (220, 40, 40)).all(-1).sum() == (64 * figures.SCALE) ** 2  # cell at 2x, once
    assert figures.attributes_of("an orange cross on a black background") == {
        "colour": "orange", "shape": "cross", "background": "black"}
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        figures.attributes_of("a lighthouse")


def test_wilson_interval_equals_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 16), (5, 16), (16, 16), (37, 64)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert quality.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_quality_vs_time_figure_draws_each_variant_with_its_interval():
    import numpy as np

    summary = {"vqgan+clip": {"seconds_per_image": 12.0, "overall": 0.6, "overall_ci95": [0.48, 0.71]},
               "sd": {"seconds_per_image": 0.9, "overall": 0.1, "overall_ci95": [0.05, 0.2]}}
    fig = quality.quality_vs_time_figure(summary, title="t")
    pixels = np.asarray(fig)
    blue, red = (pixels == (31, 119, 180)).all(-1), (pixels == (214, 39, 40)).all(-1)
    assert blue.sum() > 50 and red.sum() > 50
    # the better variant's point sits higher (smaller y) and to the right (slower)
    by, bx = np.argwhere(blue[:, :600]).mean(0)          # left of the legend
    ry, rx = np.argwhere(red[:, :600]).mean(0)
    assert by < ry and bx > rx


def test_category_bars_show_each_variant_per_category():
    import numpy as np

    s = quality.summarise(_rows("sd", [4, 0, 0, 0, 0]) + _rows("sd+clip", [4, 4, 4, 4, 4]))
    pixels = np.asarray(quality.category_bars_figure(s, title="t"))
    blue, red = (pixels == (31, 119, 180)).all(-1), (pixels == (214, 39, 40)).all(-1)
    # ranked best overall first, so sd+clip has the first colour (blue): its bars are full in every group, sd's
    # (red) only for single
    assert blue.sum() > 3 * red.sum() > 0


def test_pictures_grow_to_fit_a_legend_of_many_variants():
    """With more variants than the default height holds (20 px a legend entry), both pictures grow; the last
    legend entry (the worst variant) is drawn inside the image."""
    import numpy as np

    rows = [r for k in range(30) for r in _rows(f"v{k}", [k % 5] * 5)]
    s = quality.summarise(rows)
    for make in (quality.category_bars_figure, quality.quality_vs_time_figure):
        small = make(quality.summarise(_rows("sd", [4] * 5)))
        big = np.asarray(make(s))
        assert big.shape[0] >= 40 + 20 * 30 > small.size[1]
        legend = big[-60:-20, big.shape[1] - 400:]           # the last entries' rows, the legend's column
        assert (legend < 128).any()                          # text drawn there


def test_merge_combines_runs_of_one_prompt_set_and_refuses_others(tmp_path, capsys):
    def report(name, variant, prompts, correct, prompt_set="benchmark"):
        rows = [dict(r, correct=c, prompt=prompts[0], seed=i) for i, (r, c) in enumerate(zip(_rows(variant, [4] * 5), correct))]
        path = tmp_path / name
        path.write_text(json.dumps({"command": name, "complete": True, "prompt_set": prompt_set, "prompts": prompts,
                                    "seeds": [0, 1], "reference": None, "rows": rows}))
        return str(path)

    a = report("a.json", "sd", ["p"], [True, False])
    b = report("b.json", "sd+clip", ["p"], [True, True])
    again = report("a2.json", "sd", ["p"], [True, True])       # the same images measured again: counted once
    out = tmp_path / "all.json"
    assert quality.main(["--merge", a, b, again, "--json", str(out), "--figure", str(tmp_path / "f.png"),
                         "--bars", "none"]) == 0
    merged = json.loads(out.read_text())
    assert merged["summary"]["sd"]["overall"] == 0.5 and merged["summary"]["sd+clip"]["overall"] == 1.0
    assert merged["summary"]["sd"]["n"] == 2
    assert (tmp_path / "f.png").is_file()
    other = report("c.json", "sd", ["q"], [True], prompt_set="tuning")
    assert quality.main(["--merge", a, other, "--json", str(tmp_path / "x.json"), "--figure", "none"]) == 2
    assert "other prompts or seeds" in capsys.readouterr().err


def test_merge_takes_seconds_per_image_from_a_timing_run_and_names_what_it_lacks(tmp_path, capsys):
    """--timing: each variant's seconds per image come from the timing run (its accuracy from the merged runs);
    a merged variant the timing run lacks is a one-line error naming it; --timing without --merge is refused."""
    def report(name, rows):
        rows = [dict(r, prompt=f"p{i}", seed=0) for i, r in enumerate(rows)]
        path = tmp_path / name
        path.write_text(json.dumps({"command": name, "complete": True, "prompt_set": "benchmark", "prompts": ["p"],
                                    "seeds": [0], "reference": None, "rows": rows}))
        return str(path)

    full = report("full.json", _rows("sd", [4, 4, 2, 0, 0]) + _rows("sd+clip", [4] * 5))
    slow = [dict(r, seconds=9.0) for r in _rows("sd", [0] * 5)]
    fast = [dict(r, seconds=0.5) for r in _rows("sd+clip", [0] * 5)][:3]
    timing = report("timing.json", slow + fast)
    out = tmp_path / "all.json"
    assert quality.main(["--merge", full, "--timing", timing, "--json", str(out), "--figure", "none",
                         "--bars", "none"]) == 0
    s = json.loads(out.read_text())["summary"]
    assert s["sd"]["overall"] == pytest.approx(0.5) and s["sd+clip"]["overall"] == 1.0     # accuracy: the full run
    assert s["sd"]["seconds_per_image"] == 9.0 and s["sd+clip"]["seconds_per_image"] == 0.5
    assert s["sd"]["seconds_per_image_merged"] == 2.0 and s["sd+clip"]["seconds_from"]["images"] == 3
    only_sd = report("only_sd.json", slow)
    assert quality.main(["--merge", full, "--timing", only_sd, "--json", str(tmp_path / "x.json"),
                         "--figure", "none", "--bars", "none"]) == 2
    err = capsys.readouterr().err
    assert "no timing for sd+clip" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        quality.parse_args(["--timing", timing])
    assert "--timing goes with --merge" in capsys.readouterr().err


def test_search_headroom_judges_every_candidate_of_a_search(tmp_path):
    """benchmarks/search_headroom.py: every candidate the search renders is judged by the rule; the share with a
    right image among the first N and the kept image's verdict follow from those verdicts; the first candidate is
    the seed's own noise (the unsteered image)."""
    import subprocess

    from toyworld.paths import weights_dir

    try:
        for name in ("sd", "itm", "clip_a"):
            weights_dir(name, check=True)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "h.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "search_headroom.py"), "--prompt-set", "benchmark",
           "--per-category", "1", "--categories", "single", "counting", "--variant", "sd10+best-of-10+itm",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["category"] for r in rows] == ["single", "counting"] and all(len(r["right"]) == 10 for r in rows)
    s = report["summary"]
    for r in rows:
        assert s[r["category"]]["headroom"]["10"] == float(any(r["right"]))
        assert s[r["category"]]["headroom"]["1"] == float(r["right"][0])
        assert s[r["category"]]["right_share"] == sum(r["right"]) / 10
        assert not r["kept_right"] or any(r["right"])     # the kept image is one of the candidates
    assert s["overall"]["kept"] == sum(r["kept_right"] for r in rows) / 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stderr

    from toyworld.rule import matches, read_images
    from generators.runs import generate
    from toyworld.prompts import prompt_set
    from toyworld.variants import variant

    p = [q for q in prompt_set("benchmark", 1) if q.category == "single"][0]
    run = generate(p.text, backend="noise", preset="toy", seed=0, save=False, progress=False, eval_model="none",
                   threads=1, **{**variant("sd10").options})
    reading = read_images(run.images)[0]
    assert rows[0]["right"][0] == bool(matches(p, reading.background, reading.objects))


def test_layout_attention_reads_the_loss_and_where_the_objects_landed(tmp_path):
    """benchmarks/layout_attention.py: with the loss only read, layout guidance's first loss is the guided run's
    (the same start, read before any move); guidance lowers the loss at its last step; the summary follows from the
    rows."""
    import subprocess

    from toyworld.paths import weights_dir

    try:
        for name in ("sd", "clip_a"):
            weights_dir(name, check=True)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "l.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "layout_attention.py"), "--prompt-set", "benchmark",
           "--per-category", "1", "--starts", "unguided", "guided", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    plain, guided = report["rows"]
    assert plain["start"] == "unguided" and guided["start"] == "guided" and plain["prompt"] == guided["prompt"]
    assert plain["loss_first"] == pytest.approx(guided["loss_first"], rel=1e-5)
    assert guided["loss_last"] < plain["loss_last"]
    for row in report["rows"]:
        s = report["summary"][row["start"]]
        assert len(row["in_box"]) == 2 and s["both_in_box"] == float(all(row["in_box"]))
        assert s["right"] == float(row["right"]) and s["loss_last"] == row["loss_last"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stderr
