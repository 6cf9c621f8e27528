import math

import pytest

from guidance import Prompt, PromptSchedule, image_prompts, parse_prompt, parse_prompts, parse_schedule


def test_weights_stops_and_negatives():
    ps = parse_prompts("a red fox:1.5|snowy forest:0.5|blurry:-1|sharp:2:0.3")
    assert [p.value for p in ps] == ["a red fox", "snowy forest", "blurry", "sharp"]
    assert [p.weight for p in ps] == [1.5, 0.5, -1.0, 2.0]
    assert ps[3].stop == 0.3 and ps[0].stop == -math.inf


def test_colons_inside_text_stay():
    assert parse_prompt("time: 3pm").value == "time: 3pm"
    p = parse_prompt("ratio a:b at noon:0.5")
    assert (p.value, p.weight) == ("ratio a:b at noon", 0.5)
    p = parse_prompt("note: fog: dense:-2")
    assert (p.value, p.weight) == ("note: fog: dense", -2.0)


def test_plain_text_defaults():
    p = parse_prompt("a lighthouse at dusk")
    assert (p.value, p.weight, p.kind) == ("a lighthouse at dusk", 1.0, "text")


@pytest.mark.parametrize("bad", ["", "   ", "a|", "|b", ":1.5", "a||b"])
def test_empty_prompts_rejected(bad):
    with pytest.raises(ValueError, match="empty prompt"):
        parse_prompts(bad)


@pytest.mark.parametrize("bad", ["fox:inf", "fox:nan"])
def test_non_finite_weight_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        parse_prompts(bad)


def test_noise_prompt_needs_integer_seed():
    assert parse_prompt("42:0.5", "noise").value == "42"
    with pytest.raises(ValueError, match="integer seed"):
        parse_prompt("abc:0.5", "noise")


def test_image_prompt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_prompts([str(tmp_path / "missing.png")])
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        image_prompts([str(bad) + ":0.5"])


def test_image_prompt_weight(tmp_path):
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    (p,) = image_prompts([f"{path}:-0.5"])
    assert (p.kind, p.value, p.weight) == ("image", str(path), -0.5)


def test_schedule_switches_prompts():
    s = parse_schedule("0=a forest; 100=a city:2|fog:-1")
    assert [p.value for p in s.at(0)] == ["a forest"]
    assert [p.value for p in s.at(99)] == ["a forest"]
    assert [p.value for p in s.at(100)] == ["a city", "fog"]
    assert {p.value for p in s.all_prompts()} == {"a forest", "a city", "fog"}


def test_schedule_errors():
    with pytest.raises(ValueError, match="step 0"):
        PromptSchedule({5: "late"})
    with pytest.raises(ValueError, match="needs a step"):
        parse_schedule("a forest; 100=a city")


def test_prompt_is_hashable_and_labelled():
    assert len({Prompt("a"), Prompt("a")}) == 1
    assert Prompt("3", kind="noise").label == "noise:3"
