"""Reward models (issue 17): each from its real architecture's config at reduced width, random weights,
saved and loaded through the path a real checkpoint takes; gradients, optimisation, ensembles, errors,
steering from generate and judging from evaluate.py."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from guidance import WeightedObjectives
from guidance.rewards import (DEFAULT_WEIGHTS, REWARDS, Reward, RewardLoadError, SharedResize, load_reward,
                              parse_reward_spec)
from tiny import save_tiny_clip
from tiny_rewards import save_aesthetic, save_hps, save_imagereward

CAPTION = "a red circle on a blue background"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return {"clip": save_tiny_clip(root / "clip", seed=1), "pickscore": save_tiny_clip(root / "pick", seed=2),
            "hps": save_hps(root / "hps"), "imagereward": save_imagereward(root / "ir"),
            "aesthetic": save_aesthetic(root / "aes")}


@pytest.fixture(scope="module")
def rewards(folders):
    return {name: load_reward(f"{name}:{folder}", prompts=CAPTION) for name, folder in folders.items()}


def _pixels(seed=0, size=(40, 48)):
    return torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_registry_and_specs():
    assert set(REWARDS) >= {"clip", "pickscore", "hps", "imagereward", "aesthetic"}
    assert parse_reward_spec("pickscore=0.05") == ("pickscore", None, 0.05)
    assert parse_reward_spec("hps:v2=5") == ("hps", "v2", 5.0)
    assert parse_reward_spec("imagereward") == ("imagereward", None, DEFAULT_WEIGHTS["imagereward"])
    assert parse_reward_spec("clip:open_clip:ViT-B-32/openai=0.5") == ("clip", "open_clip:ViT-B-32/openai", 0.5)
    assert parse_reward_spec("HPSv2=1")[0] == "hps"


@pytest.mark.parametrize("name", ["clip", "pickscore", "hps", "imagereward", "aesthetic"])
def test_reward_contract(rewards, name):
    reward = rewards[name]
    assert isinstance(reward, Reward) and not reward.training
    assert all(not p.requires_grad for p in reward.parameters()) and reward.dtype == torch.float32
    pixels = _pixels().requires_grad_()
    out = reward(pixels)
    assert out.per_image.shape == (2,) and torch.isfinite(out.per_image).all()
    assert torch.allclose(out.per_image, -out.parts["score"])          # loss form: -score
    out.total.backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0       # gradients reach the image
    # metric mode (reference preprocessing on 8-bit PIL) is close to the steering path on the same image
    ref = reward.score_reference(pixels.detach(), CAPTION)
    assert ref.shape == (2,) and ref.dtype == torch.float64
    assert torch.allclose(ref.float(), reward.score(pixels.detach(), CAPTION), atol=0.05 * (1 + ref.abs().max()))


@pytest.mark.parametrize("name", ["clip", "pickscore", "hps", "imagereward", "aesthetic"])
def test_optimiser_on_pixels_raises_each_reward(rewards, name):
    reward = rewards[name]
    logits = torch.zeros(1, 3, 32, 32).normal_(generator=torch.Generator().manual_seed(1)).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.1)
    scores = []
    for _ in range(6):
        opt.zero_grad()
        out = reward(torch.sigmoid(logits))
        scores.append(float(out.parts["score"][0]))
        out.total.backward()
        opt.step()
    with torch.no_grad():
        scores.append(float(reward.score(torch.sigmoid(logits), CAPTION)[0]))
    assert scores[-1] > scores[0], scores


def test_ensemble_weights_combine_as_documented(rewards):
    pick, hps = rewards["pickscore"], rewards["hps"]
    shared = SharedResize()
    pick.resize = hps.resize = shared
    ensemble = WeightedObjectives([(pick, 0.05), (hps, 5.0)], names=["pickscore", "hps"])
    images = _pixels(3)
    out = ensemble(images)
    s_pick, s_hps = pick.score(images, CAPTION), hps.score(images, CAPTION)
    assert torch.allclose(out.per_image, -(0.05 * s_pick + 5.0 * s_hps), atol=1e-5)
    assert torch.allclose(out.parts["pickscore/score"], s_pick, atol=1e-6)      # raw scores logged unweighted
    assert torch.allclose(out.parts["hps"], -5.0 * s_hps, atol=1e-6)
    assert shared.hits >= 1                                                       # one resize for both (same size)
    pick.resize, hps.resize = SharedResize(), SharedResize()


def test_gradient_checkpointing_same_gradients(rewards):
    reward = rewards["hps"]
    grads = []
    for flag in (False, True):
        reward.gradient_checkpointing = flag
        pixels = _pixels(4).requires_grad_()
        reward(pixels).total.backward()
        grads.append(pixels.grad)
    reward.gradient_checkpointing = False
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_input_one_line_errors(tmp_path, folders):
    with pytest.raises(ValueError, match="unknown reward 'pickscroe'; choose from"):
        parse_reward_spec("pickscroe=1")
    with pytest.raises(ValueError, match="weight 'lots' is not a number"):
        parse_reward_spec("hps=lots")
    with pytest.raises(ValueError, match="not finite"):
        parse_reward_spec("hps=nan")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reward(f"hps:{tmp_path / 'nothing' / 'HPS_v2.1_compressed.pt'}")
    # a pickle that would run code when loaded: refused by weights_only, and nothing runs
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}))
    for spec in (f"hps:{bad}", f"aesthetic:{bad}"):
        with pytest.raises(RewardLoadError) as err:
            load_reward(spec)
        assert "\n" not in str(err.value) and "refused to unpickle" in str(err.value)
    assert not marker.exists()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "open_clip_config.json").write_text((folders["hps"] / "open_clip_config.json").read_text())
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, wrong / "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardLoadError, match="does not fit"):
        load_reward(f"hps:{wrong}")


def test_build_objective_unchanged_without_rewards_and_weighted_with(folders):
    from guidance import CLIPLoss
    from guidance.build import build_objective, build_schedule

    opts = {"prompt": CAPTION, "clip": [str(folders["clip"])], "cutouts": 2, "cut_pow": 1.0, "overview": 0,
            "min_fraction": 0.5, "augmentations": ["none"], "distance": "spherical"}
    schedule = build_schedule(opts)
    plain = build_objective(opts, schedule, seed=0, device="cpu", precision="auto")
    assert isinstance(plain, CLIPLoss)
    both = build_objective({**opts, "rewards": [f"pickscore:{folders['pickscore']}=0.5", f"hps:{folders['hps']}"]},
                           schedule, seed=0, device="cpu", precision="auto")
    assert isinstance(both, WeightedObjectives)
    assert both.names == ["clip_loss", "pickscore", "hps"] and both.weights == [1.0, 0.5, DEFAULT_WEIGHTS["hps"]]
    assert both.conditioning_text(0) == CAPTION
    with pytest.raises(ValueError, match="not a number"):
        build_objective({**opts, "rewards": ["hps=x"]}, schedule, seed=0, device="cpu", precision="auto")


def test_generate_with_reward_and_evaluate_held_out(tmp_path, folders):
    """The toy preset steered by a reward (a toy CLIP standing in as PickScore), then judged by metrics
    with --held-out: per-step reward scores in run.json, one column per metric."""
    from generators.runs import generate
    from generators.cli import main as cli_main  # noqa: F401 - the CLI parses --reward (below)
    from scripts.evaluate import main as evaluate_main
    from toyworld.paths import weights_dir

    run = generate(CAPTION, backend="pixels", preset="toy", seed=0, iterations=3, out=str(tmp_path / "runs"),
                   progress=False, rewards=[f"pickscore:{weights_dir('clip_c')}=0.05"])
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["steered_by"] == ["pickscore"] and len(meta["reward_scores"]["pickscore"]) == 3
    assert meta["rewards"][0]["weight"] == 0.05
    out = tmp_path / "m.json"
    rc = evaluate_main([str(tmp_path / "runs"), "--metric", f"clip_score:{weights_dir('clip_b')}", "--metric",
                        f"pickscore:{weights_dir('clip_c')}", "--held-out", "--json", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    row = doc["rows"][0]
    assert row[f"clip_score:{weights_dir('clip_b')}"] == pytest.approx(run.clip_score, abs=1e-3)
    groups = {(s["metric"], s["group"]): s["n"] for s in doc["summary"]}
    assert groups[(f"pickscore:{weights_dir('clip_c')}", "steered")] == 1
    assert groups[(f"clip_score:{weights_dir('clip_b')}", "held-out")] == 1
    assert evaluate_main([str(tmp_path / "runs"), "--metric", "pickscore=2", "--no-progress"]) == 2


def test_cli_reward_flag_keeps_the_prompt():
    from generators.cli import _one_value_per_flag
    from generators.runs.options import option_specs

    argv = _one_value_per_flag(["--reward", "pickscore=0.05", "hps", "castle"], option_specs())
    assert argv == ["--reward", "pickscore=0.05", "--reward", "hps", "castle"]


def test_missing_optional_package_is_one_line(monkeypatch, folders):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)        # as if open_clip_torch were not installed
    with pytest.raises(ImportError) as err:
        load_reward(f"hps:{folders['hps']}")
    assert "\n" not in str(err.value) and "pip install clipsteer[rewards]" in str(err.value)
    assert "open_clip_torch" in str(err.value)
