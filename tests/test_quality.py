"""benchmarks/quality.py: prompt sample, the benchmark loop on tiny models, targets, and the CLI on the toy models."""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from tiny import save_tiny_clip, save_tiny_sd, save_tiny_vqgan

ROOT = Path(__file__).resolve().parent.parent


def _load_quality():
    spec = importlib.util.spec_from_file_location("clipsteer_quality_bench", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


quality = _load_quality()


def test_prompt_sample_is_fixed_distinct_and_spread_over_shapes():
    from toyworld.world import COLOURS, SHAPES

    a = quality.sample_prompts(8, seed=0)
    assert a == quality.sample_prompts(8, seed=0)
    assert a != quality.sample_prompts(8, seed=1)
    assert len({p["prompt"] for p in a}) == 8
    for p in a:
        assert p["colour"] in COLOURS and p["background"] in COLOURS and p["shape"] in SHAPES
        assert p["colour"] != p["background"]
        assert p["shape"] in p["prompt"] and re.search(f"on an? {p['background']} background$", p["prompt"])
    assert sorted(p["shape"] for p in a) == sorted(list(SHAPES) * 2)  # 2 of each shape
    assert quality.sample_prompts(3, seed=0) == a[:3]  # a longer run extends a shorter one
    with pytest.raises(ValueError, match="--prompts is 0"):
        quality.sample_prompts(0)
    with pytest.raises(ValueError, match="give 1 to 224"):
        quality.sample_prompts(225)


def _summary(vq=None, sd=None, sdc=None, n=16):
    out = {}
    for name, acc in (("vqgan+clip", vq), ("sd", sd), ("sd+clip", sdc)):
        if acc is not None:
            c, s, b = acc
            out[name] = {"n": n, "accuracy": {"colour": c, "shape": s, "background": b, "all": min(acc)}}
    return out


def test_targets_met_missed_and_not_measured():
    t = quality.check_targets(_summary(vq=(0.9375, 0.625, 1.0), sd=(0.5, 0.25, 0.75), sdc=(0.5, 0.375, 0.5)))
    assert [x["met"] for x in t] == [True, True, True, True, False, None]   # all three: 25% -> 37.5%, +12.5 < 20
    assert t[3]["attribute"] == "shape" and "+12.5 points" in t[3]["measured"]
    t = quality.check_targets(_summary(sd=(0.5, 0.25, 0.75), sdc=(0.75, 0.5, 0.75)))
    assert t[-2]["met"] is True and "+25.0 points" in t[-2]["measured"]
    summary = _summary(sdc=(0.5, 0.25, 0.75))
    summary["sd+tfg"] = {"n": 16, "accuracy": {"colour": 1.0, "shape": 0.75, "background": 1.0, "all": 0.75}}
    summary["sd+dps"] = {"n": 16, "accuracy": {"colour": 1.0, "shape": 0.5, "background": 1.0, "all": 0.5}}
    t = quality.check_targets(summary)
    assert t[-1]["met"] is True and t[-1]["measured"].startswith("sd+tfg: 75.0% vs 25.0% (+50.0 points)")
    t = quality.check_targets(_summary(vq=(0.875, 0.5625, 0.9375), sd=(0.5, 0.25, 0.75), sdc=(1.0, 0.3125, 1.0)))
    assert [x["met"] for x in t] == [False, True, False, False, False, None]  # colour, background, shape, SD gains
    t = quality.check_targets(_summary(vq=(1.0, 1.0, 1.0)))
    assert t[-1]["met"] is None and t[-1]["measured"] is None
    assert "not run" in quality.format_targets(t) and "MET" in quality.format_targets(t)
    assert all(x["met"] is None for x in quality.check_targets({}))


@pytest.mark.filterwarnings("ignore:ignoring option")  # one options dict for both backends' models
def test_benchmark_loop_on_tiny_models(tmp_path):
    """Every variant runs through generate(), is judged and scored; seeds reproduce; summary matches rows."""
    clip = save_tiny_clip(tmp_path / "clip", seed=0, image_size=32)
    options = dict(clip=[str(clip)], vqgan=str(save_tiny_vqgan(tmp_path / "vqgan", fmt="safetensors")),
                   sd_model=str(save_tiny_sd(tmp_path / "sd")), size=(32, 32), cutouts=2, min_fraction=0.6,
                   augmentations=["none"], scheduler="ddim")
    judge_clip = quality.load_judge_clip(save_tiny_clip(tmp_path / "judge", seed=1, image_size=32), device="cpu")
    prompts = quality.sample_prompts(1, seed=3)
    seen = []
    result = quality.run_benchmark(prompts, [5], quality.VARIANTS, preset=None, options=options,
                                   judge_clip=judge_clip, iterations=3, steps=2, clip_guidance_scale=50.0,
                                   device="cpu", on_row=seen.append, log=lambda s: None)
    rows = result["rows"]
    assert not result["interrupted"] and rows == seen
    assert [r["variant"] for r in rows] == [v.name for v in quality.VARIANTS]
    from toyworld.world import COLOURS, SHAPES

    for r in rows:
        assert r["prompt"] == prompts[0]["prompt"] and r["seed"] == 5
        assert r["judged"]["background"] in COLOURS
        assert r["judged"]["shape"] in (*SHAPES, None)
        assert r["correct"]["all"] == all(r["correct"][a] for a in quality.ATTRIBUTES)
        assert math.isfinite(r["clip_score"]) and r["clip_score"] != 0.0
        assert r["seconds"] > 0 and r["generate_s"] is not None
    assert rows[0]["steps_done"] == 3 and rows[0]["settings"]["iterations"] == 3
    assert rows[1]["settings"]["clip_guidance_scale"] == 0.0 and rows[1]["settings"]["steps"] == 2
    assert rows[2]["settings"]["clip_guidance_scale"] == 50.0
    assert rows[2]["first_loss"] is not None  # guided steps record the CLIP loss
    # Same seed, same image: the row (judgement and score) repeats exactly.
    again = quality.run_benchmark(prompts, [5], quality.VARIANTS[:1], preset=None, options=options,
                                  judge_clip=judge_clip, iterations=3, device="cpu", log=lambda s: None)["rows"][0]
    assert again["judged"] == rows[0]["judged"] and again["clip_score"] == rows[0]["clip_score"]
    summary = quality.summarise(rows)
    for r in rows:
        s = summary[r["variant"]]
        assert s["n"] == 1 and s["clip_score"] == pytest.approx(r["clip_score"], abs=1e-3)
        assert s["accuracy"]["all"] == float(r["correct"]["all"])
    table = quality.format_table(summary)
    assert "VQGAN+CLIP" in table and "SD + CLIP guidance" in table


def test_reference_images_are_judged_right():
    ref = quality.reference_scores(quality.sample_prompts(8), None)
    assert ref["accuracy"] == {"colour": 1.0, "shape": 1.0, "background": 1.0, "all": 1.0}


def test_cli_on_the_toy_models(tmp_path, capsys):
    """The command line on the committed toy models; the SD variants are skipped, clearly, when the toy SD
    folder is missing. An existing JSON is never overwritten without --overwrite."""
    missing = quality.missing_toy_models(["clip_a", "clip_b", "vqgan"])
    if missing:
        pytest.skip(f"toy weights not trained yet: {', '.join(missing)}")
    sd_missing = bool(quality.missing_toy_models(["sd"]))
    out = tmp_path / "q.json"
    argv = ["--quick", "--prompts", "1", "--iterations", "2", "--steps", "2", "--device", "cpu", "--json", str(out),
            "--figure", str(tmp_path / "q.png")]
    assert quality.main(argv) == 0
    report = json.loads(out.read_text())
    captured = capsys.readouterr()
    assert report["complete"] and report["seeds"] == [0] and len(report["prompts"]) == 1
    assert "VQGAN+CLIP" in captured.out and "Targets:" in captured.out and (tmp_path / "q.png").is_file()
    ran = {r["variant"] for r in report["rows"]}
    if sd_missing:
        assert ran == {"vqgan+clip"} and set(report["skipped"]) == {"sd", "sd+clip"}
        assert "skipping sd: toy model 'sd'" in captured.err and "train_toy.py --only sd" in captured.err
    else:
        assert ran == set(quality.VARIANT_NAMES) and not report["skipped"]
    assert report["rows"][0]["steps_done"] == 2 and report["rows"][0]["clip_score"] is not None
    assert report["summary"]["vqgan+clip"]["n"] == 1 and len(report["targets"]) == 6
    before = out.read_text()
    assert quality.main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == before


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

    summary = {"vqgan+clip": {"seconds_per_image": 12.0, "accuracy": {"all": 0.6}, "all_three_ci95": [0.48, 0.71]},
               "sd": {"seconds_per_image": 0.9, "accuracy": {"all": 0.1}, "all_three_ci95": [0.05, 0.2]}}
    fig = quality.quality_vs_time_figure(summary, title="t")
    pixels = np.asarray(fig)
    blue, red = (pixels == (31, 119, 180)).all(-1), (pixels == (214, 39, 40)).all(-1)
    assert blue.sum() > 50 and red.sum() > 50
    # the better variant's point sits higher (smaller y) and to the right (slower)
    by, bx = np.argwhere(blue[:, :600]).mean(0)          # left of the legend
    ry, rx = np.argwhere(red[:, :600]).mean(0)
    assert by < ry and bx > rx


def test_merge_combines_runs_of_one_prompt_set_and_refuses_others(tmp_path, capsys):
    def report(name, variant, prompts, correct):
        rows = [{"variant": variant, "correct": {"colour": c, "shape": c, "background": c, "all": c},
                 "clip_score": 60.0, "seconds": 1.0, "generate_s": 0.9, "load_s": 0.1, "settings": {}}
                for c in correct]
        path = tmp_path / name
        path.write_text(json.dumps({"command": name, "complete": True, "prompts": prompts, "seeds": [0, 1],
                                    "reference": None, "rows": rows}))
        return str(path)

    a = report("a.json", "sd", ["p"], [True, False])
    b = report("b.json", "sd+clip", ["p"], [True, True])
    out = tmp_path / "all.json"
    assert quality.main(["--merge", a, b, "--json", str(out), "--figure", str(tmp_path / "f.png")]) == 0
    merged = json.loads(out.read_text())
    assert merged["summary"]["sd"]["accuracy"]["all"] == 0.5 and merged["summary"]["sd+clip"]["accuracy"]["all"] == 1.0
    assert (tmp_path / "f.png").is_file()
    other = report("c.json", "sd", ["q"], [True])
    assert quality.main(["--merge", a, other, "--json", str(tmp_path / "x.json"), "--figure", "none"]) == 2
    assert "other prompts or seeds" in capsys.readouterr().err
