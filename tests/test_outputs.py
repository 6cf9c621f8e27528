"""Run folders, PNG metadata, JSON sidecars, frames and animations."""

import datetime as dt
import json

import pytest
import torch
from PIL import Image

from generators.runs.outputs import (animation_formats, new_run_dir, read_metadata, read_png_text, save_animation,
                                save_gif, save_mp4, save_png, slugify, to_jsonable, to_pil, write_json)


def test_slugify():
    assert slugify("A red fox:1.5|snowy forest:0.5|blurry:-1") == "a-red-fox-snowy-forest-blurry"
    assert slugify("Café — naïve?") == "cafe-naive"
    assert slugify("!!!") == "run"
    assert len(slugify("word " * 50)) <= 48


def test_run_dirs_are_new_and_never_reused(tmp_path):
    now = dt.datetime(2024, 5, 6, 7, 8, 9)
    first = new_run_dir(tmp_path / "out", "a red fox", now=now)
    (first / "image.png").write_bytes(b"first")
    second = new_run_dir(tmp_path / "out", "a red fox", now=now)
    third = new_run_dir(tmp_path / "out", "a red fox", now=now)
    assert first.name == "20240506-070809-a-red-fox"
    assert second.name == first.name + "-2" and third.name == first.name + "-3"
    assert (first / "image.png").read_bytes() == b"first"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        new_run_dir(tmp_path / "file", "x")


def test_to_pil_rounds_and_clamps():
    images = torch.tensor([0.0, 0.5, 1.0, 1.7]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    pils = to_pil(images)
    assert len(pils) == 2 and pils[0].size == (2, 2) and pils[0].mode == "RGB"
    assert [pils[0].getpixel((x, y))[0] for y in range(2) for x in range(2)] == [0, 128, 255, 255]
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        to_pil(torch.rand(1, 4, 2, 2))


def test_png_metadata_round_trip_and_no_overwrite(tmp_path):
    meta = {"prompt": "a fox", "seed": 3, "settings": {"size": (64, 32), "stop": float("-inf")},
            "losses": [0.5] * 500}
    path = save_png(torch.rand(3, 8, 8), tmp_path / "a.png",
                    text={"prompt": "a fox", "seed": "3", "clipsteer": json.dumps(to_jsonable(meta))})
    text = read_png_text(path)
    assert text["prompt"] == "a fox" and text["seed"] == "3"
    back = read_metadata(path)
    assert back["settings"] == {"size": [64, 32], "stop": None} and len(back["losses"]) == 500
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_png(torch.rand(3, 8, 8), path)
    assert path.read_bytes() == before
    save_png(torch.rand(3, 8, 8), path, overwrite=True)
    assert path.read_bytes() != before


def test_sidecar_json(tmp_path):
    path = write_json(tmp_path / "run.json", {"seed": 1, "path": tmp_path, "t": torch.tensor([1.0, 2.0])})
    assert read_metadata(tmp_path) == {"seed": 1, "path": str(tmp_path), "t": [1.0, 2.0]}
    with pytest.raises(FileExistsError):
        write_json(path, {"seed": 2})
    assert json.loads(path.read_text())["seed"] == 1
    with pytest.raises(FileNotFoundError, match="run folder"):
        read_metadata(tmp_path / "nothing")


def _frames(n=4, size=(16, 12)):
    return [Image.new("RGB", size, (40 * i, 255 - 40 * i, 90)) for i in range(n)]


def test_gif(tmp_path):
    path = save_gif(_frames(), tmp_path / "a.gif", fps=5)
    with Image.open(path) as im:
        assert im.n_frames == 4 and im.size == (16, 12)
        assert im.info.get("loop") == 0
    with pytest.raises(FileExistsError):
        save_gif(_frames(), path)
    with pytest.raises(ValueError, match="no frames"):
        save_gif([], tmp_path / "b.gif")


def test_mp4(tmp_path):
    ffmpeg = pytest.importorskip("imageio_ffmpeg")
    path = save_animation(_frames(5, (17, 12)), tmp_path / "a.mp4", fps=5)  # odd width is made even
    assert path.stat().st_size > 0
    n_frames, seconds = ffmpeg.count_frames_and_secs(str(path))
    assert n_frames == 5 and seconds == pytest.approx(1.0, abs=0.25)
    with pytest.raises(FileExistsError):
        save_mp4(_frames(), path)


def test_animation_formats():
    assert animation_formats("none") == [] and animation_formats(None) == []
    assert animation_formats("both") == ["gif", "mp4"]
    assert animation_formats("gif,mp4") == ["gif", "mp4"] and animation_formats(["MP4"]) == ["mp4"]
    with pytest.raises(ValueError, match="unknown animation format 'avi'"):
        animation_formats("avi")
    with pytest.raises(ValueError, match="use .gif or .mp4"):
        save_animation(_frames(), "x.webm")
