"""Issue 34, second part: A1111's ``parameters`` chunk in every PNG, replay with ``--from``, a seed per image
(``seed + i``, in the file name), ``--seeds`` for one prompt and ``--seed -1``."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generators import cli
from generators.runs.outputs import read_png_text
from generators.runs import generate
from tiny import save_tiny_clip, save_tiny_sd

# The pairs of A1111's last infotext line, as its own parser matches them (modules/infotext_utils.py).
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay-models")
    return {"sd": str(save_tiny_sd(root / "sd")), "clip": str(save_tiny_clip(root / "clip", image_size=32))}


def _pixels_opts(models, out):
    return dict(backend="pixels", clip=[models["clip"]], eval_model="none", width=32, height=32, iterations=3,
                cutouts=2, augmentations=["none"], progress=False, out=str(out))


def _argv(models, out):
    return ["a red circle|blurry:-0.5", "--backend", "pixels", "--clip", models["clip"], "--eval-model", "none",
            "--size", "32", "32", "--iterations", "3", "--cutouts", "2", "--augment", "none", "--no-progress",
            "--out", str(out)]


def _array(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def _a1111(text: str) -> tuple[list[str], dict[str, str]]:
    """Prompt lines and the pairs of the last line, split as A1111 splits an infotext."""
    *lines, last = text.strip().split("\n")
    assert len(A1111_PAIR.findall(last)) >= 3, f"last line is not A1111 pairs: {last!r}"
    return lines, {k: v for k, v in A1111_PAIR.findall(last)}


def _folder_hash(folder: Path) -> str:
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}\n"
                    for p in sorted(folder.rglob("*.safetensors"), key=lambda p: p.relative_to(folder).as_posix()))
    return hashlib.sha256(lines.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# PNG metadata
# ---------------------------------------------------------------------------------------------

def test_png_carries_a1111_parameters_and_no_prompt_chunk_comfyui_would_misread(models, tmp_path):
    run = generate("a red circle", backend="sd", sd_model=models["sd"], clip=[models["clip"]], eval_model="none",
                   scheduler="euler", steps=2, cfg_scale=3.0, negative_prompt="blue, dark", cutouts=2,
                   augmentations=["none"], seed=5, progress=False, out=str(tmp_path))
    text = read_png_text(run.image_path)
    if "prompt" in text:                        # ComfyUI JSON.parses a "prompt" chunk before anything else
        json.loads(text["prompt"])
    lines, pairs = _a1111(text["parameters"])
    assert lines == ["a red circle", 'Negative prompt: blue, dark']
    assert (pairs["Steps"], pairs["Sampler"], pairs["CFG scale"], pairs["Seed"], pairs["Size"]) == \
        ("2", "Euler", "3", "5", f"{run.image.width}x{run.image.height}")
    assert pairs["Model hash"] == _folder_hash(Path(models["sd"])) and pairs["Model"] == "sd"
    assert pairs["Backend"] == "sd" and "CLIP guidance scale" in pairs and pairs["Guider"] == "clip"
    assert json.loads(text["clipsteer"])["settings"]["cfg_scale"] == 3.0        # the full settings as JSON
    assert run.metadata["model"] == {"name": "sd", "hash": pairs["Model hash"]}


def test_optimiser_png_writes_iterations_as_steps_and_quotes_values_with_commas(models, tmp_path):
    run = generate("a red circle, large|blurry:-0.5", seed=2, **_pixels_opts(models, tmp_path))
    lines, pairs = _a1111(read_png_text(run.image_path)["parameters"])
    assert lines == ["a red circle, large|blurry:-0.5"]
    assert (pairs["Steps"], pairs["Sampler"], pairs["Seed"], pairs["Size"]) == ("3", "Adam", "2", "32x32")
    assert pairs["Model hash"] == _folder_hash(Path(models["clip"]))       # no SD or VQGAN: the first CLIP
    assert pairs["CLIP"] and pairs["Cutouts"] == "2"


def test_a1111_infotext_maps_to_options():
    from generators.runs.infotext import options_from_parameters

    text = ("a castle on a hill, (sunset:1.2)\nmore prompt\nNegative prompt: ugly, blurry\n"
            'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, '
            'Lora hashes: "a: 1, b: 2", Version: v1.6.0')
    assert options_from_parameters(text) == {
        "prompt": "a castle on a hill, (sunset:1.2)\nmore prompt", "negative_prompt": "ugly, blurry",
        "num_inference_steps": 20, "guidance_scale": 7.0, "seed": 965400086, "width": 512, "height": 768,
        "scheduler": "euler_a"}


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------

def test_from_png_and_from_run_json_give_the_same_pixels_and_options_override(models, tmp_path, capsys):
    assert cli.main(_argv(models, tmp_path / "a") + ["--seed", "4"]) == 0
    (first,) = (tmp_path / "a").iterdir()
    png = next(first.glob("*.png"))
    original = _array(png)
    for source in (png, first / "run.json"):
        out = tmp_path / f"from-{source.suffix[1:]}"
        assert cli.main(["--from", str(source), "--out", str(out), "--no-progress"]) == 0
        (again,) = out.iterdir()
        meta = json.loads((again / "run.json").read_text())
        assert np.array_equal(_array(again / meta["image"]), original)
        assert meta["replayed_from"] and meta["seed"] == 4
    out = tmp_path / "override"
    assert cli.main(["--from", str(png), "--seed", "9", "--out", str(out), "--no-progress"]) == 0
    (other,) = out.iterdir()
    meta = json.loads((other / "run.json").read_text())
    assert meta["seed"] == 9 and meta["settings"]["iterations"] == 3
    assert not np.array_equal(_array(other / meta["image"]), original)


def test_replay_in_python_and_bad_sources(models, tmp_path):
    from generators.runs.replay import replay

    run = generate("a red circle", seed=1, **_pixels_opts(models, tmp_path / "a"))
    again = replay(run.image_path, out=str(tmp_path / "b"), progress=False)
    assert np.array_equal(np.asarray(again.image), np.asarray(run.image))
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="no clipsteer or A1111 settings"):
        generate(from_=plain)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate(from_=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not both"):
        generate(from_=run.image_path, config={"iterations": 2})


def test_from_an_a1111_png_reads_its_settings(models, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a red circle\nNegative prompt: blue\nSteps: 2, Sampler: Euler, CFG scale: 2.5, "
                                "Seed: 11, Size: 64x64, Model hash: 0123456789, Model: something")
    png = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    run = generate(from_=png, sd_model=models["sd"], clip=[models["clip"]], eval_model="none", cutouts=2,
                   augmentations=["none"], progress=False, out=str(tmp_path / "out"))
    s = run.metadata["settings"]
    assert run.metadata["backend"] == "sd" and (s["prompt"], s["negative_prompt"], s["steps"], s["cfg_scale"],
                                                s["seed"], s["width"], s["height"], s["scheduler"]) == \
        ("a red circle", "blue", 2, 2.5, 11, 64, 64, "euler")


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------

def test_image_i_of_a_batch_uses_seed_plus_i_and_names_carry_index_and_seed(models, tmp_path):
    assert cli.main(_argv(models, tmp_path / "two") + ["--num-images", "2", "--seed", "5"]) == 0
    assert cli.main(_argv(models, tmp_path / "one") + ["--seed", "6"]) == 0
    (two,), (one,) = (tmp_path / "two").iterdir(), (tmp_path / "one").iterdir()
    meta = json.loads((two / "run.json").read_text())
    assert meta["images"] == ["00000-5.png", "00001-6.png"] and meta["seeds"] == [5, 6]
    assert np.array_equal(_array(two / "00001-6.png"), _array(one / "00000-6.png"))
    assert not np.array_equal(_array(two / "00000-5.png"), _array(two / "00001-6.png"))
    second = read_png_text(two / "00001-6.png")
    assert second["seed"] == "6" and json.loads(second["clipsteer"])["seed"] == 6
    assert _a1111(second["parameters"])[1]["Seed"] == "6"
    # replaying the second PNG gives that image alone
    assert cli.main(["--from", str(two / "00001-6.png"), "--out", str(tmp_path / "re"), "--no-progress"]) == 0
    (re_run,) = (tmp_path / "re").iterdir()
    assert np.array_equal(_array(re_run / "00000-6.png"), _array(one / "00000-6.png"))


def test_seeds_for_one_prompt_and_seed_minus_one(models, tmp_path):
    assert cli.main(_argv(models, tmp_path / "s") + ["--seeds", "3,7"]) == 0
    (folder,) = (tmp_path / "s").iterdir()
    meta = json.loads((folder / "run.json").read_text())
    assert meta["images"] == ["00000-3.png", "00001-7.png"] and meta["seeds"] == [3, 7]
    assert cli.main(["--from", str(folder / "run.json"), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    (again,) = (tmp_path / "again").iterdir()
    assert sorted(p.name for p in again.glob("*.png")) == ["00000-3.png", "00001-7.png"]
    assert np.array_equal(_array(again / "00001-7.png"), _array(folder / "00001-7.png"))
    run = generate("a red circle", seed=-1, **_pixels_opts(models, tmp_path / "r"))
    assert 0 <= run.seed < 2**32 and run.metadata["settings"]["seed"] == run.seed
    assert run.image_path.name == f"00000-{run.seed}.png"


# ---------------------------------------------------------------------------------------------
# Inputs kept in the run folder (the web UI's uploads)
# ---------------------------------------------------------------------------------------------

def test_keep_inputs_copies_the_init_image_into_the_run_and_replay_uses_the_copy(models, tmp_path):
    start = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(start)
    run = generate("a red circle", seed=1, init_image=str(start), image_prompts=[f"{start}:0.5"], keep_inputs=True,
                   **_pixels_opts(models, tmp_path / "a"))
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["settings"]["init_image"] == "inputs/start.png" and meta["inputs"] == ["inputs/start.png"]
    assert meta["settings"]["image_prompts"] == ["inputs/start.png:0.5"]
    assert (run.path / "inputs" / "start.png").read_bytes() == start.read_bytes()
    start.unlink()                                       # the run folder holds what it was made from
    again = generate(from_=run.path / "run.json", out=str(tmp_path / "b"), progress=False)
    assert np.array_equal(np.asarray(again.image), np.asarray(run.image))


def test_upload_policy_caps_the_size_and_lets_a_run_read_only_its_own_uploads(tmp_path):
    from webui.policy import MAX_UPLOAD_BYTES, ServerPolicy

    policy = ServerPolicy(tmp_path / "out")
    upload = tmp_path / "upload.png"
    Image.new("RGB", (8, 8)).save(upload)
    options = {"prompt": "a red circle", "backend": "pixels", "init_image": str(upload)}
    with pytest.raises(ValueError, match="reads files only from"):
        policy.check_run(options)
    assert policy.check_run(options, (policy.check_upload(upload, "init image"),))["init_image"] == str(upload)
    with open(upload, "r+b") as fh:
        fh.truncate(MAX_UPLOAD_BYTES + 1)
    with pytest.raises(ValueError, match="larger than the web UI takes"):
        policy.check_upload(upload, "init image")
