"""The one result contract of generators/base.py, checked for every registered backend on tiny models.

losses are per-image means; a callback's early stop sets ``stopped_at`` (``interrupted`` is Ctrl-C
only); the same seed gives the same image; every backend's run folder has the same metadata keys.
A backend written in a user's own file registers with ``generators.register`` and runs through
``generators.runs.generate`` with a preset.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import generators
from generators.base import GenerationResult, seed_generator, stream_seed
from generators.runs import generate
from guidance import LossOutput, Objective
from tiny import save_tiny_clip, save_tiny_sd, save_tiny_vqgan

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = generators.backend_names()


class Recording(Objective):
    """An objective that remembers each call's per-image loss and checks the images it is given."""

    def __init__(self):
        super().__init__()
        self.target = torch.nn.Parameter(torch.tensor([0.9, 0.1, 0.1]), requires_grad=False)
        self.per_image: list[torch.Tensor] = []

    def forward(self, images, *, step=0, generator=None):
        assert images.dim() == 4 and images.shape[1] == 3 and images.is_floating_point()
        assert generator is None or isinstance(generator, torch.Generator)
        per_image = (images.mean((2, 3)) - self.target).pow(2).sum(1)
        self.per_image.append(per_image.detach().clone())
        return LossOutput(total=per_image.sum(), per_image=per_image, parts={"colour": per_image.detach()})

    def conditioning_text(self, step=0):
        return "a red circle"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    return {"vqgan": str(save_tiny_vqgan(root / "vqgan", fmt="safetensors")),
            "sd": str(save_tiny_sd(root / "sd")),
            "clip_a": str(save_tiny_clip(root / "clip_a", seed=0, image_size=32)),
            "clip_b": str(save_tiny_clip(root / "clip_b", seed=1, image_size=32))}


def backend(name, models, **overrides):
    """A backend instance on tiny models, 4 steps, 2 images."""
    options = {"vqgan": dict(vqgan=models["vqgan"], width=32, height=32, iterations=4, num_images=2),
               "sd": dict(sd_model=models["sd"], steps=4, scheduler="ddim", clip_guidance_scale=200.0, num_images=2),
               "pixels": dict(width=32, height=32, iterations=4, num_images=2),
               "noise": dict(sd_model=models["sd"], render_steps=2, scheduler="ddim", iterations=4, num_images=2,
                             learning_rate=1.0, reg_weight=0.0)}.get(name)
    if options is None:
        pytest.skip(f"no tiny configuration for backend {name!r}")
    return generators.get_generator(name, {**options, **overrides}, device="cpu")


@pytest.mark.parametrize("name", BACKENDS)
def test_losses_are_per_image_means_and_seeds_reproduce(name, models):
    gen = backend(name, models)
    objective = Recording()
    result = gen.generate(objective, seed=5)
    assert isinstance(result, GenerationResult)
    assert result.images.shape[0] == 2 and result.images.dtype == torch.float32
    assert result.images.device.type == "cpu" and 0 <= result.images.min() and result.images.max() <= 1
    assert result.steps_done == 4 and result.stopped_at is None and not result.interrupted
    assert len(result.losses) == len(objective.per_image) > 0
    for logged, per_image in zip(result.losses, objective.per_image):
        assert per_image.shape == (2,)
        assert logged == pytest.approx(float(per_image.mean()), rel=1e-5)
    again = backend(name, models).generate(Recording(), seed=5)
    torch.testing.assert_close(again.images, result.images, rtol=0, atol=0)
    other = backend(name, models).generate(Recording(), seed=6)
    assert (other.images - result.images).abs().max() > 1e-4


@pytest.mark.parametrize("name", BACKENDS)
def test_callback_stop_and_ctrl_c(name, models):
    gen = backend(name, models)
    seen = []
    stopped = gen.generate(Recording(), seed=1, callback=lambda info: seen.append(info.step) or info.step < 1)
    assert stopped.stopped_at == 1 and stopped.steps_done == 2 and not stopped.interrupted and seen == [0, 1]

    def ctrl_c(info):
        if info.step == 2:
            raise KeyboardInterrupt

    interrupted = gen.generate(Recording(), seed=1, callback=ctrl_c)
    assert interrupted.interrupted and interrupted.stopped_at is None and interrupted.steps_done == 3
    assert torch.isfinite(interrupted.images).all() and interrupted.images.shape[0] == 2


def test_seed_streams_are_derived_without_overflow():
    assert stream_seed(7, "init") == 7
    top = 2**64 - 1
    assert 0 <= stream_seed(top, "objective") < 2**63 and stream_seed(top, "objective") != stream_seed(top, "init")
    assert stream_seed(7, "objective") != stream_seed(8, "objective")
    torch.testing.assert_close(torch.rand(3, generator=seed_generator(7)), torch.rand(3, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="seed"):
        stream_seed(-1)
    with pytest.raises(ValueError, match="seed"):
        stream_seed(2**64)


def test_every_backend_writes_the_same_metadata_keys(models, tmp_path):
    common = dict(clip=[models["clip_a"]], eval_model=models["clip_b"], cutouts=2, min_fraction=0.6,
                  augmentations=["none"], out=str(tmp_path), progress=False, seed=3)
    per_backend = {"vqgan": dict(vqgan=models["vqgan"], size=(32, 32), iterations=2),
                   "sd": dict(sd_model=models["sd"], steps=2, scheduler="ddim"),
                   "pixels": dict(size=(32, 32), iterations=2),
                   "noise": dict(sd_model=models["sd"], render_steps=1, scheduler="ddim", iterations=2)}
    keys = {}
    for name in BACKENDS:
        if name not in per_backend:
            continue
        run = generate("a red circle", backend=name, **common, **per_backend[name])
        sidecar = json.loads((run.path / "run.json").read_text())
        keys[name] = set(sidecar)
        assert sidecar["backend"] == name and sidecar["steps_done"] == 2 and sidecar["stopped_at"] is None
    assert len({frozenset(k) for k in keys.values()}) == 1, keys


USER_BACKEND = '''
from dataclasses import dataclass

import torch

import generators
from generators.base import GenerationResult, Generator, option, seed_generator


@dataclass
class FlatSettings:
    shade: float = option(0.5, "grey level of the start", minimum=0, maximum=1)
    width: int = option(16, "width")
    height: int = option(16, "height")
    iterations: int = option(3, "steps", minimum=0)


class FlatColour(Generator):
    """One flat colour, moved down the objective's gradient."""

    name = "flat"
    Settings = FlatSettings
    presets = {"toy": lambda: {"iterations": 2}}

    def generate(self, objective, *, seed=0, callback=None):
        from generators.optimise import optimise

        s = self.settings
        colour = (torch.rand(1, 3, 1, 1, generator=seed_generator(seed)) * 0 + s.shade).requires_grad_()
        render = lambda c: c.expand(1, 3, s.height, s.width)
        out = optimise(colour, render, objective, lr=0.1, steps=s.iterations, callback=callback,
                       generator=seed_generator(seed, "objective"))
        return GenerationResult(images=render(colour).detach(), losses=out.losses, steps_done=out.steps_done,
                                stopped_at=out.stopped_at, interrupted=out.interrupted)


generators.register("flat", FlatColour)
'''


def test_a_backend_in_a_users_own_file_runs_through_the_public_api(tmp_path):
    """Outside the package, in a fresh process: register, list in --help, run with the toy preset."""
    from toyworld import paths

    if not all((paths.WEIGHTS_DIR / n).is_dir() for n in ("clip_a", "clip_b", "clip_c", "clip_d")):
        pytest.skip("toy weights are not trained yet")
    (tmp_path / "my_backend.py").write_text(USER_BACKEND)
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import my_backend  # registers "flat"
        from generators import cli
        from generators.runs import generate
        assert "--shade" in cli.build_parser().format_help()
        run = generate("a red circle on a blue background", backend="flat", preset="toy", shade=0.25, seed=1,
                       out={str(tmp_path / 'out')!r}, progress=False)
        print(json.dumps({{"shape": list(run.images.shape), "steps": run.metadata["steps_done"],
                          "shade": run.metadata["backend_settings"]["shade"], "path": str(run.path)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 3, 64, 64] and result["steps"] == 2 and result["shade"] == 0.25
    assert len(list(Path(result["path"]).glob("00000-*.png"))) == 1


class _Red(Objective):
    def forward(self, images, *, step=0, generator=None):
        per_image = (images.clamp(0, 1).mean((2, 3)) - torch.tensor([0.9, 0.1, 0.1])).pow(2).sum(1)
        return LossOutput(total=per_image.sum(), per_image=per_image)

    def conditioning_text(self, step=0):
        return "a red circle"


@pytest.mark.parametrize("name, base, option, value", [
    ("pixels", {}, "parameterisation", "rgb"),
    ("pixels", {}, "decorrelate", False),
    ("pixels", {}, "fft_decay", 2.0),
    ("pixels", {}, "init_scale", 0.5),
    ("pixels", {}, "grad_clip", 1e-6),
    ("pixels", {}, "lr_schedule", "step"),
    ("noise", {"cfg_scale": 3.0}, "negative_prompt", "blurry"),
    ("noise", {}, "cfg_scale", 3.0),
])
def test_each_backend_option_changes_the_result(models, name, base, option, value):
    """An option that were ignored would give the default image."""
    default = backend(name, models, **base).generate(_Red(), seed=3).images
    changed = backend(name, models, **base, **{option: value}).generate(_Red(), seed=3).images
    assert (default - changed).abs().max() > 1e-5


@pytest.mark.parametrize("parameterisation", ["rgb", "fft"])
def test_pixels_init_image_is_the_start(tmp_path, parameterisation):
    from PIL import Image

    picture = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 200 + 20).round().to(torch.uint8)
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(tmp_path / "start.png")
    gen = generators.get_generator("pixels", {"width": 32, "height": 32, "iterations": 0, "init_image":
                                              str(tmp_path / "start.png"), "parameterisation": parameterisation})
    start = gen.generate(_Red(), seed=0).images[0]
    torch.testing.assert_close(start, picture.float() / 255, rtol=0, atol=2e-3)
