"""``--precision auto``: the rule per device and capability (a pure function of what torch reports), and an
explicit ``--precision`` always winning, down to what a run records in run.json."""

from __future__ import annotations

import json

import pytest
import torch

from guidance.runtime import Capabilities, auto_precision, choose_precision, device_capabilities, resolve_dtype
from tiny import save_tiny_clip, save_tiny_vqgan


@pytest.mark.parametrize("caps, expected", [
    (Capabilities("cuda", cuda_bf16=True, name="NVIDIA H100"), "bf16"),
    (Capabilities("cuda", cuda_bf16=False, name="Tesla T4"), "fp16"),
    (Capabilities("cpu", cpu_avx512_bf16=True, cpu_amx=True), "bf16"),
    (Capabilities("cpu", cpu_avx512_bf16=True), "bf16"),            # AMD Zen 4, Cooper Lake
    (Capabilities("cpu", cpu_amx=True), "bf16"),
    (Capabilities("cpu"), "fp32"),                                   # AVX2 / AVX-512 without BF16: emulated bf16
    (Capabilities("mps", mps_autocast=True), "fp16"),
    (Capabilities("mps", mps_autocast=False), "fp32"),
    (Capabilities("xpu"), "fp32"),
])
def test_auto_rule_for_each_device_and_capability(caps, expected):
    choice = auto_precision(caps)
    assert choice.precision == expected and choice.asked == "auto"
    assert choice.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]
    assert choice.reason     # says why (printed and recorded)


def test_auto_on_this_cpu_follows_what_torch_reports():
    caps = device_capabilities("cpu")
    assert caps.device_type == "cpu"
    assert caps.cpu_avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert caps.cpu_amx == torch.cpu._is_amx_tile_supported()
    assert choose_precision("auto", "cpu") == auto_precision(caps)
    assert resolve_dtype("auto", torch.device("cpu")) == auto_precision(caps).dtype


@pytest.mark.parametrize("asked, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("BF16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16), (None, torch.float32)])
def test_an_explicit_precision_wins(asked, expected):
    choice = choose_precision(asked, "cpu")
    assert choice.dtype == expected and choice.asked != "auto"


def test_bad_precisions_are_one_line_errors():
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU; use --precision fp32, bf16 or auto"):
        choose_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp8'; use auto, fp32, fp16 or bf16"):
        choose_precision("fp8", "cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vqgan": str(save_tiny_vqgan(root / "vqgan", fmt="safetensors")),
            "clip": str(save_tiny_clip(root / "clip", seed=0, image_size=32))}


def _run(models, tmp_path, precision, **extra):
    from generators.runs import generate

    return generate("a red circle", seed=0, vqgan=models["vqgan"], clip=[models["clip"]], eval_model="none",
                    size=(32, 32), iterations=2, cutouts=2, min_fraction=0.6, augmentations=["none"],
                    out=str(tmp_path), progress=False, precision=precision, **extra)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_run_json_records_the_precision_used_and_why(models, tmp_path, precision, capsys, monkeypatch):
    from generators.runs import session

    monkeypatch.setattr(session, "_ANNOUNCED", set())
    run = _run(models, tmp_path, precision)
    sidecar = json.loads((run.path / "run.json").read_text())
    expected = choose_precision(precision, "cpu")
    assert sidecar["precision_choice"] == expected.as_dict()
    assert sidecar["precision"] == str(expected.dtype).replace("torch.", "")
    assert sidecar["settings"]["precision"] == precision
    _run(models, tmp_path, precision)
    err = capsys.readouterr().err
    assert err.count("precision auto:") == (1 if precision == "auto" else 0)     # printed once, for auto only
    if precision == "auto":
        assert str(expected) in err


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_every_model_of_a_run_gets_the_one_choice(models, precision):
    from generators.runs.options import resolve_options
    from generators.runs.session import prepare
    from guidance import Encoder

    backend, opts, provenance = resolve_options("a red circle", backend="vqgan", vqgan=models["vqgan"],
                                                clip=[models["clip"]], eval_model="none", size=(32, 32),
                                                precision=precision)
    prep = prepare(backend, opts, provenance)
    encoders = [m for m in prep.objective.modules() if isinstance(m, Encoder)]
    expected = choose_precision(precision, "cpu").dtype
    assert prep.generator.dtype == expected and encoders and all(e.dtype == expected for e in encoders)


def test_the_toy_preset_runs_fp32_unless_asked():
    """The toy models are too small for bf16 to pay (``--preset toy`` sets fp32; an explicit option wins)."""
    from generators.runs.options import resolve_options

    for extra, expected in (({}, "fp32"), ({"precision": "bf16"}, "bf16"), ({"precision": "auto"}, "auto")):
        _, opts, _ = resolve_options("a red circle", preset="toy", backend="vqgan", **extra)
        assert opts["precision"] == expected
