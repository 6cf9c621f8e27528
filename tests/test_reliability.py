"""The hostile-user audit (issue 15): each defect found, as a test that failed before its fix."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generators import cli
from generators.runs.outputs import read_metadata, read_png_text
from generators.runs import generate
from guidance import CLIPLoss, clip_score, parse_prompts, read_image
from generators import evaluate as evaluate_script  # the evaluate command (scripts/evaluate.py wraps it)
from tiny import save_tiny_clip, save_tiny_sd, save_tiny_vqgan, tiny_encoder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return {"vqgan": str(save_tiny_vqgan(root / "vqgan", fmt="safetensors")), "sd": str(save_tiny_sd(root / "sd")),
            "clip_a": str(save_tiny_clip(root / "clip_a", seed=0, image_size=32)),
            "clip_b": str(save_tiny_clip(root / "clip_b", seed=1, image_size=32))}


@pytest.fixture
def opts(models, tmp_path):
    return dict(vqgan=models["vqgan"], clip=[models["clip_a"]], eval_model=models["clip_b"], size=(32, 32),
                iterations=3, cutouts=2, min_fraction=0.6, augmentations=["none"], out=str(tmp_path / "out"),
                progress=False)


def _image_file(tmp_path, name="pic.png", colour=(200, 30, 30)):
    path = tmp_path / name
    Image.new("RGB", (32, 32), colour).save(path)
    return str(path)


# -- 1. evaluate.py scores a run against the caption generate.py scored it against ---------------------------
def test_evaluate_scores_runs_against_the_prompts_generate_scored(opts, models, tmp_path):
    story = generate(story="0=a red circle; 2=a blue square|fog:-1", seed=1, **opts)
    image_only = generate(image_prompts=[_image_file(tmp_path)], seed=1, **opts)
    negative_only = generate("a cat:-1", seed=1, **opts)
    out = tmp_path / "table.json"
    assert evaluate_script.main([opts["out"], "--model", models["clip_b"], "--json", str(out), "--no-progress"]) == 0
    rows = {Path(r["image"]).parent.name: r for r in json.loads(out.read_text())["rows"]}
    row = rows[story.path.name]
    assert row["prompt"] == "a blue square" and row["status"] == "ok"
    assert row["score"] == pytest.approx(story.clip_score, abs=1e-4)          # the same number as generate.py
    for run in (image_only, negative_only):
        assert rows[run.path.name]["status"] == "not scorable" and run.clip_score is None
        assert "no positive-weight text prompt" in rows[run.path.name]["error"]


# -- 2. every image mode PIL opens is read right ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["I;16", "I", "P", "LA", "CMYK", "RGBA", "L"])
def test_image_reader_handles_every_mode(mode, tmp_path):
    grey = np.tile(np.linspace(0, 255, 32, dtype=np.float64), (32, 1))
    if mode in ("I;16", "I"):
        im = Image.fromarray((grey * 257).astype(np.uint16)) if mode == "I;16" else \
            Image.fromarray((grey * 257).astype(np.int32), mode="I")
    else:
        im = Image.fromarray(grey.astype(np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I") else "x.png")
    im.save(path)
    got = read_image(path).float()
    expected = torch.from_numpy(grey).float().expand(3, 32, 32)
    assert got.shape == (3, 32, 32) and (got - expected).abs().max() <= 2, mode


def test_sixteen_bit_png_scores_like_its_eight_bit_copy(models, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 48)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "eight.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    eight = float(clip_score([tmp_path / "eight.png"], "a cat", model=models["clip_b"]))
    sixteen = float(clip_score([tmp_path / "sixteen.png"], "a cat", model=models["clip_b"]))
    assert sixteen == pytest.approx(eight, abs=1e-5)


# -- 3. --clip none with SD keeps the text prompt ----------------------------------------------------------------
def test_sd_without_clip_is_conditioned_on_the_prompt(models, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = generate("a red circle", backend="sd", sd_model=models["sd"], clip=["none"], seed=7, steps=3,
                   scheduler="ddim", eval_model="none", save=False, progress=False, channels_last=False,
                   precision="fp32")     # the float32 pipeline's images (auto is bf16 on a CPU with native bf16)
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="pt", guidance_scale=7.5)
    prompted = pipe("a red circle", generator=torch.Generator().manual_seed(7), **kw).images
    empty = pipe("", generator=torch.Generator().manual_seed(7), **kw).images
    torch.testing.assert_close(run.images, prompted, rtol=0, atol=1e-5)
    assert (run.images - empty).abs().max() > 1e-3


# -- 4. --range-weight acts -----------------------------------------------------------------------------------------
def test_range_weight_changes_a_run_whose_decoder_overshoots(models):
    from generators.vqgan.backend import VQGANGenerator, VQGANSettings, load_vqgan
    from guidance import Cutouts

    import copy

    bright = copy.deepcopy(load_vqgan(models["vqgan"]))     # the cached model is shared: scale a copy
    with torch.no_grad():
        bright.decoder.conv_out.weight.mul_(40)
        bright.decoder.conv_out.bias.add_(1.0)
    settings = VQGANSettings(width=32, height=32, iterations=4, channels_last=False)
    images = {}
    for weight in (0.0, 100.0):
        loss = CLIPLoss(tiny_encoder(0), "a red circle", cutouts=Cutouts(2, augmentations=[]),
                        image_losses={"range": weight} if weight else None)
        out = VQGANGenerator(settings, model=bright).generate(loss, seed=3)
        images[weight] = out.images
    assert (images[0.0] - images[100.0]).abs().max() > 1e-4


def test_range_loss_sees_what_the_renderer_overshot():
    fn = CLIPLoss(tiny_encoder(0), "a fox", image_losses={"range": 1.0})
    images = torch.full((1, 3, 32, 32), 1.5, requires_grad=True)
    out = fn(images)
    assert float(out.parts["range"][0]) == pytest.approx(0.25)
    out.total.backward()
    assert images.grad.abs().sum() > 0


# -- 5. each PNG carries its own score --------------------------------------------------------------------------------
def test_each_png_holds_its_own_clip_score(opts):
    run = generate("a red circle", seed=2, num_images=2, **opts)
    per_image = run.metadata["clip_scores"]["per_image"]
    assert len(per_image) == 2 and per_image[0] != per_image[1]
    for path, expected in zip(run.image_paths, per_image):
        assert float(read_png_text(path)["clip_score"]) == pytest.approx(expected, abs=1e-4)


# -- 6. frames and animations are not results ---------------------------------------------------------------------------
def test_evaluate_a_run_folder_with_a_prompt_skips_frames_and_animation(opts, models, tmp_path):
    run = generate("a red circle", seed=2, save_every=1, animation="gif", **opts)
    assert (run.path / "frames").is_dir() and (run.path / "animation.gif").is_file()
    out = tmp_path / "t.json"
    assert evaluate_script.main([str(run.path), "--prompt", "a cat", "--model", models["clip_b"], "--json", str(out),
                                 "--no-progress"]) == 0
    assert [r["image"] for r in json.loads(out.read_text())["rows"]] == ["00000-2.png"]


# -- 7. a second Ctrl-C never loses the image --------------------------------------------------------------------------------
def test_a_second_ctrl_c_while_saving_keeps_the_image(opts, monkeypatch):
    from generators.runs import outputs

    def press_ctrl_c(info):
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    real_save = outputs.save_png
    pressed = []

    def save_png(*args, **kwargs):
        if not pressed:
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)      # the impatient second press, mid-save
        return real_save(*args, **kwargs)

    monkeypatch.setattr(outputs, "save_png", save_png)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)   # as an interactive shell starts us
    try:
        run = generate("a red circle", seed=1, callback=press_ctrl_c, **{**opts, "iterations": 5})
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert pressed and run.interrupted and run.image_path.is_file()
    meta = read_metadata(run.path)
    assert meta["interrupted"] is True and meta["steps_done"] == 2
    assert after is signal.default_int_handler     # restored after the run


# -- 8. evaluate.py checks it can write before scoring ----------------------------------------------------------------
def test_evaluate_refuses_an_unwritable_table_before_scoring(opts, models, tmp_path, monkeypatch, capsys):
    generate("a red circle", seed=1, **opts)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    scored = []
    monkeypatch.setattr(evaluate_script, "evaluate", lambda *a, **k: scored.append(1) or [])
    code = evaluate_script.main([opts["out"], "--model", models["clip_b"], "--json", str(blocker / "t.json")])
    assert code == 2 and not scored
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the table" in err[0]


# -- 9. non-finite and out-of-range numbers are refused, naming the option ----------------------------------------------
@pytest.mark.parametrize("option, value", [("tv_weight", math.nan), ("init_weight", math.nan),
                                           ("learning_rate", math.inf), ("cut_pow", -1.0), ("cutouts", 0),
                                           ("fps", 0.0)])
def test_non_finite_and_out_of_range_options_are_refused(opts, option, value):
    with pytest.raises(ValueError, match=option.replace("learning_rate", "lr").replace("_", "-")) as info:
        generate("a red circle", seed=0, save=False, **{**opts, option: value})
    assert "\n" not in str(info.value)


def test_cli_refuses_nan_guidance_scale(models, tmp_path, capsys):
    argv = ["a red circle", "--backend", "sd", "--sd", models["sd"], "--clip", models["clip_a"],
            "--clip-guidance-scale", "nan", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-guidance-scale" in err[0] and "finite" in err[0]


# -- 10. silent no-ops are refused or warned -------------------------------------------------------------------------------
def test_silent_no_ops(opts, models, tmp_path):
    with pytest.raises(ValueError, match="weight 0"):
        generate("a red circle:0", seed=0, save=False, **opts)
    with pytest.raises(ValueError, match="--clip none leaves the vqgan backend nothing to optimise"):
        generate("a red circle", seed=0, save=False, **{**opts, "clip": ["none"]})
    with pytest.warns(UserWarning, match="--strength does nothing without --init-image"):
        generate("a red circle", backend="sd", sd_model=models["sd"], clip=["none"], steps=2, strength=0.5,
                 eval_model="none", save=False, progress=False)
    with pytest.warns(UserWarning, match=r"story step\(s\) 50 start at or after the run's last step"):
        generate(story="0=a red circle; 50=a blue square", seed=0, save=False, **opts)


# -- 11. a ratio is text, not a weight --------------------------------------------------------------------------------------
def test_ratios_and_times_stay_in_the_prompt():
    assert [(p.value, p.weight) for p in parse_prompts("a landscape in 16:9")] == [("a landscape in 16:9", 1.0)]
    assert [(p.value, p.weight) for p in parse_prompts("a landscape in 16:9 :2")] == [("a landscape in 16:9", 2.0)]
    assert [(p.value, p.weight, p.stop) for p in parse_prompts("a cat:1:0.5")] == [("a cat", 1.0, 0.5)]


# -- 12. list options never swallow the prompt ---------------------------------------------------------------------------------
def test_list_options_take_one_value_per_flag_and_never_the_prompt(tmp_path):
    assert cli.parse_args(["--augment", "Af", "a red circle"]) == {"augmentations": ["Af"], "prompt": "a red circle"}
    assert cli.parse_args(["--augment", "Af", "Pe", "Ji", "a red circle"]) == \
        {"augmentations": ["Af", "Pe", "Ji"], "prompt": "a red circle"}
    image = _image_file(tmp_path)
    assert cli.parse_args(["--image-prompt", image, "a fox", "--noise-prompt", "4:0.5"]) == \
        {"image_prompts": [image], "prompt": "a fox", "noise_prompts": ["4:0.5"]}
    assert cli.parse_args(["--clip", "org/a=1", "org/b", "a fox"]) == {"clip": ["org/a=1", "org/b"], "prompt": "a fox"}


# -- 13. seeds: a defined range, checked, sub-streams without overflow -------------------------------------------------------------
def test_seed_range(opts, models, capsys, tmp_path):
    for seed in (-2, 2**64, 2**70):                 # (-1 is A1111's "random")
        with pytest.raises(ValueError, match=r"seed .* out of range|seed must be"):
            generate("a red circle", seed=seed, save=False, **opts)
    with pytest.raises(SystemExit):
        cli.parse_args(["a red circle", "--seed", "2**70"])
    assert "argument --seed: invalid int value" in capsys.readouterr().err
    assert cli.main(["a red circle", "--seed", str(2**70), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 1180591620717411303424 is out of range" in err[0]
    top = generate("a red circle", backend="sd", sd_model=models["sd"], steps=2, seed=2**64 - 1, save=False,
                   progress=False, clip=[models["clip_a"]], eval_model="none", cutouts=2, augmentations=["none"])
    assert top.seed == 2**64 - 1 and torch.isfinite(top.images).all()


# -- 14. one validation of images and prompts at the public boundary --------------------------------------------------------------
def test_python_api_validates_prompts_and_images(models):
    for prompt in (b"a cat", 5):
        with pytest.raises(ValueError, match="option prompt .* must be text"):
            generate(prompt, save=False)
    enc = tiny_encoder(0)
    with pytest.raises(TypeError, match="prompts must be text"):
        CLIPLoss(enc, 5)
    bad = {"uint8": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "empty batch": torch.zeros(0, 3, 8, 8),
           "NaN": torch.full((1, 3, 8, 8), math.nan), r"0\.\.255": torch.full((1, 3, 8, 8), 200.0)}
    for match, images in bad.items():
        with pytest.raises(ValueError, match=match):
            CLIPLoss(enc, "a cat")(images)
    with pytest.raises(ValueError, match="caption is empty"):
        clip_score(torch.rand(1, 3, 32, 32), "", model=models["clip_b"])


# -- 15. messages name the real problem -----------------------------------------------------------------------------------------------
def test_messages_name_the_problem(opts, models, tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        generate("a fox", image_prompts=[str(tmp_path)], save=False, **opts)
    with pytest.raises(FileNotFoundError, match="init image"):
        generate("a fox", backend="sd", sd_model=models["sd"], init_image=str(tmp_path / "no.png"), save=False,
                 progress=False)
    with pytest.raises(ValueError, match=r"width -64 .* use 4$"):
        generate("a fox", seed=0, save=False, **{**opts, "size": (-64, 32)})
    with pytest.raises(ValueError, match="option --cutouts"):
        generate("a fox", seed=0, save=False, **{**opts, "cutouts": 0})
    from guidance.encoders import load_encoder, parse_open_clip_spec

    with pytest.raises(OSError, match="hf download some-org/no-such-clip"):
        load_encoder("some-org/no-such-clip")
    assert parse_open_clip_spec("open_clip:hf-hub:laion/CLIP-ViT-B-32") == ("hf-hub:laion/CLIP-ViT-B-32", None)
    assert parse_open_clip_spec("open_clip:local-dir:/m/clip") == ("local-dir:/m/clip", None)
    assert parse_open_clip_spec("open_clip:ViT-B-32//m/clip.pt") == ("ViT-B-32", "/m/clip.pt")
    with pytest.raises(FileNotFoundError, match="open_clip checkpoint"):
        load_encoder("open_clip:ViT-B-32//no/such/clip.pt")


# -- 16. options are checked before any model loads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    (dict(init_image="/no/such.png"), "init image"), (dict(size=(30, 32)), "width 30"),
    (dict(optimizer="Lion"), "unknown optimizer"), (dict(vqgan="/no/such/vqgan"), "neither a known model"),
])
def test_bad_options_fail_before_any_model_loads(opts, options, match, monkeypatch):
    import guidance.build

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(guidance.build, "load_encoders", no_loading)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        generate("a fox", seed=0, save=False, **{**opts, **options})


# -- 17. --no-progress silences the libraries' bars too ----------------------------------------------------------------------------------
def test_no_progress_silences_library_bars(opts):
    import transformers.utils.logging as tlog

    tlog.enable_progress_bar()          # as a fresh process has it (another test may have turned it off)
    seen = []
    generate("a fox", seed=0, save=False, callback=lambda info: seen.append(tlog.is_progress_bar_enabled()), **opts)
    assert seen and not any(seen) and tlog.is_progress_bar_enabled()
