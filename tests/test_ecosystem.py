"""Habits of neighbouring tools (issue 34): diffusers' argument names and PIL output, "did you mean" for
unknown flags, VQGAN-CLIP's '^' story syntax, and quiet third-party output with -q/-v."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from generators import cli
from generators.runs import build_schedule, generate, resolve_options
from tiny import save_tiny_clip, save_tiny_sd, save_tiny_vqgan


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eco-models")
    return {"sd": str(save_tiny_sd(root / "sd")), "clip": str(save_tiny_clip(root / "clip", image_size=32)),
            "vqgan": str(save_tiny_vqgan(root / "vqgan", fmt="safetensors"))}


def _sd(models, **options):
    return generate("a red circle", backend="sd", sd_model=models["sd"], clip=[models["clip"]], eval_model="none",
                    scheduler="euler", cutouts=2, augmentations=["none"], save=False, progress=False, **options)


# ---------------------------------------------------------------------------------------------
# diffusers' names
# ---------------------------------------------------------------------------------------------

def test_the_diffusers_call_equals_the_clipsteer_call(models):
    ours = _sd(models, seed=3, steps=2, cfg_scale=3.0, num_images=2, negative_prompt="blue")
    diffusers_names = dict(generator=torch.Generator().manual_seed(3), num_inference_steps=2, guidance_scale=3.0,
                           num_images_per_prompt=2, negative_prompt="blue")
    assert torch.equal(_sd(models, **diffusers_names).images, ours.images)
    diffusers_names["generator"] = torch.Generator().manual_seed(3)
    theirs = _sd(models, **diffusers_names, output_type="pil")
    assert ours.images.shape[0] == 2 and isinstance(theirs.images, list) and len(theirs.images) == 2
    theirs.images[0].save  # a PIL image, as diffusers' pipe(...).images[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours.pil_images, theirs.images))
    settings = theirs.metadata["settings"]
    assert (settings["seed"], settings["steps"], settings["cfg_scale"], settings["num_images"]) == (3, 2, 3.0, 2)
    assert settings["clip_guidance_scale"] == ours.metadata["settings"]["clip_guidance_scale"]  # not the CFG knob
    other = _sd(models, seed=3, steps=2, cfg_scale=1.0, num_images=2, negative_prompt="blue")
    assert not torch.equal(other.images, ours.images)     # the CFG scale matters, so the equality above means something


def test_num_inference_steps_means_each_backends_own_steps():
    for backend, target in (("sd", "steps"), ("noise", "render_steps"), ("vqgan", "iterations"),
                            ("pixels", "iterations")):
        _, opts, sources = resolve_options("x", backend=backend, num_inference_steps=3, num_images_per_prompt=2)
        assert opts[target] == 3 and opts["num_images"] == 2 and sources["sources"][target] == "arguments"
    _, opts, _ = resolve_options("x", backend="noise", guidance_scale=4)
    assert opts["cfg_scale"] == 4.0
    with pytest.warns(UserWarning, match=r"ignoring option\(s\) cfg_scale"):   # VQGAN has no CFG
        resolve_options("x", backend="vqgan", guidance_scale=4)


@pytest.mark.parametrize("options, match", [
    (dict(steps=2, num_inference_steps=3), "option steps is given twice .*'steps' and 'num_inference_steps'"),
    (dict(generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]), "list of 2 generators"),
    (dict(generator=torch.Generator().manual_seed(1), seed=2), "seed=2 and generator .*1.* disagree"),
    (dict(generator=5), "generator must be a torch.Generator; got int"),
    (dict(output_type="np"), "output_type 'np': use 'pt'"),
    (dict(guidance_scal=2), "did you mean 'guidance_scale'"),
])
def test_diffusers_names_that_cannot_be_honoured_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as info:
        generate("a red circle", backend="sd", save=False, **options)
    assert "\n" not in str(info.value)


def test_a_used_generator_is_refused_and_a_fresh_one_gives_its_seed():
    used = torch.Generator().manual_seed(7)
    torch.randn(2, generator=used)
    with pytest.raises(ValueError, match="has drawn numbers since it was seeded with 7"):
        resolve_options("x", generator=used)
    _, opts, _ = resolve_options("x", generator=[torch.Generator().manual_seed(7)])
    assert opts["seed"] == 7


# ---------------------------------------------------------------------------------------------
# the command line: diffusers' flags, "did you mean", -q / -v
# ---------------------------------------------------------------------------------------------

def test_cli_takes_diffusers_flags():
    args = cli.parse_args(["a cat", "--num-inference-steps", "3", "--guidance-scale", "2.5",
                           "--num-images-per-prompt", "2", "--negative-prompt", "blurry"])
    assert args == {"prompt": "a cat", "num_inference_steps": 3, "guidance_scale": 2.5, "num_images_per_prompt": 2,
                    "negative_prompt": "blurry"}
    _, opts, _ = resolve_options(backend="sd", **args)
    assert (opts["steps"], opts["cfg_scale"], opts["num_images"], opts["negative_prompt"]) == (3, 2.5, 2, "blurry")


@pytest.mark.parametrize("argv, line", [
    (["a cat", "--iteratons", "3"], "generate.py: error: unknown option --iteratons; did you mean --iterations?"),
    (["a cat", "--guidance-sacle=3"], "generate.py: error: unknown option --guidance-sacle; did you mean "
                                     "--guidance-scale?"),
    (["a cat", "--seeed", "3"], "generate.py: error: unknown option --seeed; did you mean --seed?"),
    (["a cat", "--zzzz"], "generate.py: error: unknown option --zzzz; see --help for the options"),
])
def test_an_unknown_flag_is_one_line_naming_the_closest_options(argv, line, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_default_run_hides_the_libraries_loading_bars_and_v_shows_them(models, tmp_path, capfd):
    import transformers.utils.logging as transformers_logging

    from generators.runs import clear_caches

    argv = ["a red circle", "--vqgan", models["vqgan"], "--clip", models["clip"], "--eval-model", "none",
            "--size", "32", "32", "--iterations", "2", "--cutouts", "2", "--seed", "1", "--out", str(tmp_path)]
    runs = {}
    for flag in ([], ["-v"], ["-q"]):
        clear_caches()                     # models load again, so their loading bars would show
        assert cli.main(argv + flag) == 0
        runs[tuple(flag)] = capfd.readouterr()
    assert "Loading weights" not in runs[()].err and "step" in runs[()].err      # our own bar stays
    assert "Loading weights" in runs[("-v",)].err
    assert runs[("-q",)].err == "" and "saved" in runs[("-q",)].out
    assert transformers_logging.is_progress_bar_enabled()          # restored after the command


def test_verbosity_hides_third_party_warnings_unless_v(capsys):
    from generators.runs.logs import LOGGER, verbosity

    def emit():
        warnings.warn_explicit("library says", FutureWarning, "/x/site-packages/lib/mod.py", 1, registry={})
        warnings.warn_explicit("clipsteer says", UserWarning, "/x/generators/runs/session.py", 1, registry={})
        LOGGER.info("details")

    for level, expected in ((-1, []), (0, ["warning: clipsteer says"]),
                            (1, ["warning: library says", "warning: clipsteer says", "info: details"])):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with verbosity(level):
                emit()
        assert capsys.readouterr().err.splitlines() == expected, level
    assert LOGGER.level == logging.NOTSET and not LOGGER.handlers


# ---------------------------------------------------------------------------------------------
# VQGAN-CLIP's '^' story syntax
# ---------------------------------------------------------------------------------------------

def test_caret_story_switches_phrase_every_n_steps_and_loops():
    schedule = build_schedule({"prompt": "a sunflower|photo:-1 ^ a rose", "change_prompt_every": 10})
    first = [(p.value, p.weight) for p in schedule.at(0)]
    assert first == [("a sunflower", 1.0), ("photo", -1.0)]         # never 'photo:-1 ^ a rose' with weight 1
    assert [p.value for p in schedule.at(9)] == ["a sunflower", "photo"]
    assert [p.value for p in schedule.at(10)] == [p.value for p in schedule.at(19)] == ["a rose"]
    assert [p.value for p in schedule.at(20)] == ["a sunflower", "photo"]   # back to the first, as nerdyrodent's
    assert schedule.positive_text(35) == "a rose"


@pytest.mark.parametrize("opts, match", [
    ({"prompt": "a sunflower|photo:-1 ^ a rose"}, "'\\^' separates VQGAN-CLIP story phrases: add "
                                                 "--change-prompt-every N .* or write the story as --story"),
    ({"prompt": "a rose", "change_prompt_every": 5}, "--change-prompt-every goes with '\\^'"),
    ({"prompt": "a ^ b", "change_prompt_every": 5, "story": "100=c"}, "give the story once"),
    ({"prompt": "a ^ ", "change_prompt_every": 5}, "empty prompt"),
])
def test_caret_story_misuse_is_a_one_line_error(opts, match):
    with pytest.raises(ValueError, match=match) as info:
        build_schedule(opts)
    assert "\n" not in str(info.value)


def test_caret_story_from_the_command_line_and_its_scoring_caption(models, tmp_path):
    from guidance.evaluation.pairs import run_caption

    args = cli.parse_args(["a red circle ^ a blue square", "--change-prompt-every", "2"])
    run = generate(**args, vqgan=models["vqgan"], clip=[models["clip"]], eval_model="none", size=(32, 32),
                   iterations=5, cutouts=2, augmentations=["none"], seed=0, save=False, progress=False)
    assert list(run.metadata["prompts"]) == ["0", "2"]
    assert run_caption(run.metadata) == ("a red circle", "")     # step 4 of a 2-phrase, every-2 story: phrase 0


# ---------------------------------------------------------------------------------------------
# scripts/evaluate.py: GenEval's layout, extra columns, --group-by
# ---------------------------------------------------------------------------------------------

def _evaluate_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("clipsteer_evaluate_eco", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_scores_every_sample_of_a_geneval_export(models, tmp_path, capsys):
    import json

    from guidance.score import clip_score

    rows = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"},
            {"tag": "colors", "include": [{"class": "cross", "count": 1, "color": "green"}], "prompt": "a green cross"}]
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["--prompts-file", str(prompts), "--seeds", "0,1", "--out", str(tmp_path / "out"), "--export",
                     "geneval", "--vqgan", models["vqgan"], "--clip", models["clip"], "--eval-model", "none",
                     "--size", "32", "32", "--iterations", "2", "--cutouts", "2", "-q"]) == 0
    export = tmp_path / "out-geneval"
    assert _evaluate_script().main([str(export), "--model", models["clip"], "--group-by", "tag", "--no-progress"]) == 0
    doc = json.loads((export / "clip_scores.json").read_text())
    scored = {(r["image"], r["prompt"], r["tag"]) for r in doc["rows"] if r["status"] == "ok"}
    assert scored == {(f"{i:05d}/samples/{n:04d}.png", row["prompt"], row["tag"]) for i, row in enumerate(rows)
                      for n in range(2)}
    first = doc["rows"][0]
    assert first["include"] == rows[0]["include"]                          # GenEval's own keys kept
    assert first["score"] == pytest.approx(float(clip_score(export / first["image"], first["prompt"],
                                                            model=models["clip"], reduction="none")[0]), abs=1e-4)
    groups = {s["group"]: s["n"] for s in doc["summary"] if "group" in s}
    assert groups == {"single_object": 2, "colors": 2}
    assert "tag=colors" in capsys.readouterr().out


def test_evaluate_keeps_pairs_columns_and_groups_by_category(models, tmp_path, capsys):
    import csv
    import json
    import math
    import statistics

    from PIL import Image

    categories = ["Colors", "Colors", "Colors", "Counting", "Counting"]
    with open(tmp_path / "drawbench.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "Prompt", "Category"])
        for i, cat in enumerate(categories):
            arr = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
            Image.fromarray(arr.numpy()).save(tmp_path / f"{i}.png")
            writer.writerow([f"{i}.png", f"a picture number {i}", cat])
    script = _evaluate_script()
    args = [str(tmp_path), "--pairs", str(tmp_path / "drawbench.csv"), "--model", models["clip"], "--no-progress",
            "--definition", "per_pair", "--json", str(tmp_path / "t.json"), "--csv", str(tmp_path / "t.csv")]
    assert script.main(args + ["--group-by", "Category"]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert [r["Category"] for r in doc["rows"]] == categories
    with open(tmp_path / "t.csv", newline="") as fh:
        assert [r["Category"] for r in csv.DictReader(fh)] == categories
    colors = [r["score"] for r in doc["rows"] if r["Category"] == "Colors"]
    line = next(s for s in doc["summary"] if s.get("group") == "Colors")
    half = 4.302652729911275 * statistics.stdev(colors) / math.sqrt(3)          # Student t, 2 df, 95%
    assert (line["n"], line["prompt"]) == (3, "Category=Colors")
    assert line["mean"] == pytest.approx(statistics.fmean(colors))
    assert (line["ci_low"], line["ci_high"]) == pytest.approx((statistics.fmean(colors) - half,
                                                                statistics.fmean(colors) + half))
    assert next(s for s in doc["summary"] if s.get("group") == "Counting")["n"] == 2
    assert "Category=Counting" in capsys.readouterr().out
    # the same groups with --metric; a column no row has is a one-line error before any scoring
    assert script.main(args[:3] + ["--no-progress", "--metric", f"clip_score:{models['clip']}", "--group-by", "Category",
                                   "--json", str(tmp_path / "m.json")]) == 0
    groups = {s["group"]: s["n"] for s in json.loads((tmp_path / "m.json").read_text())["summary"]}
    assert groups == {"all": 5, "Colors": 3, "Counting": 2}
    capsys.readouterr()
    assert script.main(args + ["--group-by", "category_typo"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "evaluate.py: error: --group-by category_typo: no such column; the rows have Category, backend, definition, "
        "error, image, model, prefix, prompt, score, seed, status, steered_by"]


# ---------------------------------------------------------------------------------------------
# GIF through diffusers' export_to_gif
# ---------------------------------------------------------------------------------------------

def test_gif_through_diffusers_keeps_the_frames_and_holds_the_last_one(tmp_path):
    from PIL import Image

    from generators.runs.outputs import save_gif

    frames = [Image.new("RGB", (16, 12), (40 * i, 255 - 40 * i, 90)) for i in range(4)]
    path = save_gif(frames, tmp_path / "a.gif", fps=5)
    with Image.open(path) as im:
        durations, pixels = [], []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
            pixels.append(np.asarray(im.convert("RGB")))
        assert im.info.get("loop") == 0
    assert durations == [200, 200, 200, 1000]              # 5 fps; the last frame shown for a second
    assert all(np.array_equal(p, np.asarray(f)) for p, f in zip(pixels, frames))
    with pytest.raises(FileExistsError):
        save_gif(frames[:1], path)
    with Image.open(path) as im:
        assert im.n_frames == 4                             # the refused call left the file alone
