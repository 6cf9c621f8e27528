"""No host syncs in the hot loops: tensor-to-host conversions counted per step, with the progress bar on.

A conversion of a device tensor (``.item()``, ``float()``, ``int()``, ``bool()``, ``.cpu()``, ``.tolist()``,
``.numpy()``) makes the host wait for every queued kernel. The tensor methods are wrapped to count those calls
(instrumentation only: each call still runs torch's own method) between consecutive step callbacks. On this
CPU every tensor is a host tensor, so calls are told apart by where they are made; a few places convert
tensors that live on the host by design, in a GPU run too, and are not counted:

- ``guidance/cutouts.py``: cutout boxes and the augmentation seed come from the run's CPU ``torch.Generator``
  (a seed means the same numbers on every machine); the boxes are copied to the device without blocking;
- ``kornia/augmentation``: kornia draws augmentation parameters on the CPU and copies them without blocking;
- ``torch/optim``: a non-fused optimiser keeps its step counter as a CPU scalar;
- ``diffusers``' Euler schedulers keep their ``sigmas`` on the CPU ("to avoid too much CPU/GPU communication").

Every other conversion is attributed to the innermost clipsteer frame that made it (inside diffusers' PNDM or
DDIM ``step``, for example, it is the loop's call of ``scheduler.step``) and counted.
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch

from generators.runs.progress import Progress as _Progress
from generators.diffusion.sampling import Settings, StableDiffusionGenerator
from generators.vqgan.taming import TamingConfig, build_first_stage
from generators.vqgan.backend import VQGANGenerator, VQGANSettings
from guidance import CLIPLoss, Cutouts
from tiny import tiny_sd_pipeline, tiny_vqgan_config

CONVERSIONS = ("item", "__float__", "__int__", "__bool__", "__index__", "cpu", "tolist", "numpy")
HOST_BY_DESIGN = ("guidance/cutouts.py", "kornia/augmentation", "torch/optim", "diffusers/schedulers/scheduling_euler")
REFRESH = 3      # the progress bar shows the loss (one sync) every REFRESH steps


class SyncCounter:
    """Counts tensor-to-host conversions made while ``armed``, by call site; the calls themselves run unchanged."""

    def __init__(self, monkeypatch):
        self.armed = False
        self.sites: Counter = Counter()
        for name in CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))

    def _wrap(self, method, name):
        def counted(tensor, *args, **kwargs):
            if self.armed:
                self.armed = False          # conversions inside the conversion are torch's own
                try:
                    self._record(name)
                finally:
                    self.armed = True
            return method(tensor, *args, **kwargs)
        return counted

    def _record(self, name: str) -> None:
        frames = traceback.extract_stack()[:-2]     # without this frame and the wrapper
        site = next((f for f in reversed(frames) if "site-packages" not in f.filename
                     or any(part in f.filename.replace("\\", "/") for part in HOST_BY_DESIGN)), frames[-1])
        where = site.filename.replace("\\", "/")
        if not any(part in where for part in HOST_BY_DESIGN):
            self.sites[f"{name} at {where.rsplit('/', 2)[-2:]}:{site.lineno} ({site.name})"] += 1


def run_counted(counter: SyncCounter, gen, objective):
    """Run *gen* with the session's progress bar (loss shown every REFRESH steps); conversions per step
    from the callback of one step to that of the next (the set-up before the first step is not counted)."""
    progress = _Progress(enabled=True, save_every=0, frames_dir=None, user=None, refresh=REFRESH)
    per_step: list[Counter] = []
    totals: list[int] = []

    def callback(info):
        totals.append(info.total)
        counter.armed = False
        if info.step >= 1:
            per_step.append(counter.sites.copy())
        counter.sites.clear()
        counter.armed = True
        return progress(info)

    try:
        gen.generate(objective, seed=0, callback=callback)
    finally:
        counter.armed = False
        progress.close()
    assert len(per_step) == totals[-1] - 1 > REFRESH
    return per_step


def check_budget(per_step: list[Counter]) -> None:
    """At most one conversion per step, and only at steps whose callback showed the loss."""
    for i, sites in enumerate(per_step):       # per_step[i]: from the callback of step i to that of step i + 1
        budget = 1 if (i + 1) % REFRESH == 0 else 0     # the callback of step i showed the loss
        assert sum(sites.values()) <= budget, f"step {i + 1}: {dict(sites)} (budget {budget})"
    assert any(sum(s.values()) for s in per_step), "the progress bar's loss read was not seen: counter broken?"


@pytest.fixture()
def counter(monkeypatch):
    return SyncCounter(monkeypatch)


def test_vqgan_loop_syncs_only_for_the_progress_bar(counter, encoder):
    model = build_first_stage(TamingConfig.from_dict(tiny_vqgan_config()))
    gen = VQGANGenerator(VQGANSettings(width=32, height=32, iterations=7, grad_clip=1.0,
                                       lr_schedule="cosine"), model=model)
    loss = CLIPLoss(encoder, "a red circle|blue:-0.5", cutouts=Cutouts(4), image_losses={"tv": 0.1})
    check_budget(run_counted(counter, gen, loss))


@pytest.mark.parametrize("mode", ["x0", "full"])
@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler"])
def test_guided_sd_loop_syncs_only_for_the_progress_bar(counter, encoder, mode, scheduler):
    gen = StableDiffusionGenerator(Settings(steps=7, prompt="a red circle", scheduler=scheduler,
                                            clip_guidance_scale=100.0, guidance_gradient=mode),
                                   device="cpu", pipeline=tiny_sd_pipeline())
    loss = CLIPLoss(encoder, "a red circle", cutouts=Cutouts(2))
    check_budget(run_counted(counter, gen, loss))


def test_counter_sees_a_sync_in_the_loop(counter, encoder):
    """The instrument itself: an objective that reads its loss on the host every step is caught."""
    class Reads(CLIPLoss):
        def forward(self, images, **kw):
            out = super().forward(images, **kw)
            float(out.total)
            return out

    model = build_first_stage(TamingConfig.from_dict(tiny_vqgan_config()))
    gen = VQGANGenerator(VQGANSettings(width=32, height=32, iterations=5), model=model)
    per_step = run_counted(counter, gen, Reads(encoder, "a red circle", cutouts=Cutouts(2)))
    assert all(any("__float__" in site for site in s) for s in per_step)
    with pytest.raises(AssertionError, match="budget 0"):
        check_budget(per_step)
