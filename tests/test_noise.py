"""The noise backend (ReNO-style noise optimisation and search) on a tiny Stable Diffusion built from configs."""

from __future__ import annotations

import math

import pytest
import torch

from generators.diffusion.noise import NoiseGenerator, NoiseSettings, noise_norm_regulariser
from generators.optimise import optimise
from guidance import LossOutput, Objective
from tiny import tiny_sd_pipeline


class Brightness(Objective):
    """Lower is better: distance of the mean colour from a bright red (differentiable)."""

    def __init__(self):
        super().__init__()
        self.target = torch.nn.Parameter(torch.tensor([0.9, 0.2, 0.2]), requires_grad=False)

    def forward(self, images, *, step=0, generator=None):
        per_image = (images.clamp(0, 1).mean((2, 3)) - self.target).pow(2).sum(1)
        return LossOutput(total=per_image.sum(), per_image=per_image, parts={"red": per_image.detach()})

    def conditioning_text(self, step=0):
        return "a red circle"


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def make(pipe, **options):
    options = {"render_steps": 1, "scheduler": "ddim", "iterations": 6, "learning_rate": 5.0, **options}
    return NoiseGenerator(NoiseSettings(**options), device="cpu", pipeline=pipe)


def test_regulariser_is_the_gaussian_norm_prior():
    d = 4 * 8 * 8
    z = torch.randn(1, 4, 8, 8).requires_grad_()
    with torch.no_grad():
        z.mul_(math.sqrt(d - 1) / z.norm())
    noise_norm_regulariser(z, 1.0).sum().backward()
    assert z.grad.norm() < 1e-3                        # stationary at ||z|| = sqrt(d - 1), where it is 0
    assert float(noise_norm_regulariser(z.detach(), 1.0)) == pytest.approx(0.0, abs=1e-3)
    small, large = torch.full((1, d), 0.1), torch.full((1, d), 3.0)
    typical = torch.full((1, d), math.sqrt((d - 1) / d))
    assert noise_norm_regulariser(typical, 1.0) < noise_norm_regulariser(small, 1.0)
    assert noise_norm_regulariser(typical, 1.0) < noise_norm_regulariser(large, 1.0)


def test_the_regulariser_keeps_the_noise_gaussian_typical(pipe):
    typical = math.sqrt(4 * 8 * 8)
    drift = {}
    for weight in (0.0, 0.01):                          # ReNO's recipe: lr 5, gradient norm clipped at 0.1
        result = make(pipe, iterations=20, reg_weight=weight, keep_best=False).generate(Brightness(), seed=0)
        drift[weight] = abs(result.info["noise_norm"][0] - typical) / typical
    assert drift[0.01] < 0.02 and drift[0.01] < drift[0.0]


@pytest.mark.parametrize("steps", [1, 4])
def test_the_objective_falls_and_the_best_iterate_is_returned(pipe, steps):
    objective = Brightness()
    result = make(pipe, render_steps=steps, iterations=8, reg_weight=0.0).generate(objective, seed=1)
    assert result.losses[-1] < result.losses[0] and len(result.losses) == 8
    best = result.info["best_step"][0]
    assert result.losses[best] == min(result.losses)
    final = float(objective(result.images).per_image[0])
    assert final == pytest.approx(min(result.losses), abs=2e-3)      # the image shown is the best one


def test_best_iterate_not_last_in_the_shared_loop():
    target = torch.tensor(0.3)

    class Near(Objective):
        def forward(self, images, *, step=0, generator=None):
            per_image = (images.mean((1, 2, 3)) - target).pow(2)
            return LossOutput(total=per_image.sum(), per_image=per_image)

    x = torch.zeros(1, 3, 4, 4, requires_grad=True)
    result = optimise(x, lambda v: v, Near(), optimizer="SGD", lr=60.0, steps=6, keep_best=True)
    assert result.losses[-1] > min(result.losses)                      # it overshoots: the last is not the best
    assert float((x.mean() - target) ** 2) == pytest.approx(min(result.losses), rel=1e-5)


def test_checkpointing_gives_the_same_gradient(pipe):
    grads = []
    for checkpointing in (False, True):
        gen = make(pipe, render_steps=3, checkpointing=checkpointing)
        conditioning, _ = gen._embeddings(gen.pipe, Brightness(), 1)
        render = gen.make_renderer(gen.pipe, gen.scheduler, conditioning, 3, seed=0)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
        Brightness()(render(z)).total.backward()
        grads.append(z.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["best-of-n", "zero-order"])
def test_search_spends_exactly_its_budget(pipe, method):
    calls = []
    original = pipe.vae.decode

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pipe.vae.decode = counting
    try:
        gen = make(pipe, method=method, budget=7, neighbours=3)
        result = gen.generate(Brightness(), seed=2)
        decodes_for_result = 1                      # the final image is rendered once more
    finally:
        pipe.vae.decode = original
    assert result.info["renderer_calls"] == 7 and len(result.losses) == 7
    assert len(calls) == 7 + decodes_for_result
    assert min(result.info["best_loss"]) == pytest.approx(min(result.losses), abs=1e-6)


def test_zero_order_search_improves_on_its_starting_noise(pipe):
    result = make(pipe, method="zero-order", budget=13, neighbours=4, search_radius=0.8).generate(Brightness(), seed=4)
    assert min(result.losses) < result.losses[0]


def test_reapply_renders_the_best_noise_with_another_pipeline(pipe):
    other = tiny_sd_pipeline(seed=1)
    gen = NoiseGenerator(NoiseSettings(render_steps=1, scheduler="ddim", iterations=2, reapply_steps=3),
                         device="cpu", pipeline=pipe, reapply_pipeline=other)
    plain = make(pipe, iterations=2).generate(Brightness(), seed=0)
    again = gen.generate(Brightness(), seed=0)
    assert again.info["reapplied_with"]["steps"] == 3 and (again.images - plain.images).abs().max() > 1e-3


@pytest.mark.parametrize("options, match", [
    (dict(iterations=0), "gradient method needs at least 1"),
    (dict(method="best-of-n", budget=0), "budget is 0"),
    (dict(scheduler="dpm++"), "cannot differentiate through DPMSolverMultistepScheduler"),
    (dict(method="annealing"), "unknown method"),
    (dict(method="best-of-n", search_first=4), "--search-first is for the gradient method"),
])
def test_bad_input_is_one_line(pipe, options, match):
    with pytest.raises(ValueError, match=match) as info:
        make(pipe, **options)
    assert "\n" not in str(info.value)


def test_step_noises_render_as_the_pipeline_with_those_noises(pipe):
    """DNO: with --step-noises the renderer is DDIM at eta 1 fed its per-step noises from the optimised
    tensor; fed the noises the pipeline itself draws, it gives the pipeline's image."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    steps = 3
    gen = make(pipe, render_steps=steps, step_noises=True, iterations=1)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    drawn = torch.Generator().manual_seed(6)
    noises = [torch.randn(1, 4, 8, 8, generator=drawn) for _ in range(steps)]
    conditioning, _ = gen._embeddings(pipe, Brightness(), 1)
    render = gen.make_renderer(pipe, gen.scheduler, conditioning, steps, seed=0)
    with torch.no_grad():
        ours = render(torch.cat([start, *noises], dim=1)).clamp(0, 1)
    reference = StableDiffusionPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(gen.scheduler.config)})
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a red circle", num_inference_steps=steps, guidance_scale=1.0, eta=1.0, latents=start,
                       generator=torch.Generator().manual_seed(6), output_type="pt",
                       height=gen.height, width=gen.width).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_step_noises_are_optimised_too(pipe):
    gen = make(pipe, render_steps=2, step_noises=True, iterations=4, reg_weight=0.0, keep_best=False)
    assert gen.latent_shape() == (1, 12, 8, 8)                    # the start and one noise per step
    z = torch.randn(gen.latent_shape(), generator=torch.Generator().manual_seed(0)).requires_grad_()
    conditioning, _ = gen._embeddings(pipe, Brightness(), 1)
    render = gen.make_renderer(pipe, gen.scheduler, conditioning, 2, seed=0)
    Brightness()(render(z)).total.backward()
    start, first, _last = z.grad.chunk(3, dim=1)
    assert start.abs().sum() > 0 and first.abs().sum() > 0   # the final step adds no noise (alpha_prev = 1)
    result = gen.generate(Brightness(), seed=0)
    assert result.losses[-1] < result.losses[0]
    assert result.info["step_noises"] == 2 and len(result.info["noise_norm"]) == 1


@pytest.mark.parametrize("options, match", [
    ({"step_noises": True, "scheduler": "euler_a", "render_steps": 2}, "needs the DDIM sampler"),
    ({"step_noises": True, "render_steps": 1}, "no step noise"),
    ({"step_noises": True, "render_steps": 2, "eta": 0.0}, "adds no noise"),
])
def test_step_noises_bad_input_is_one_line(pipe, options, match):
    with pytest.raises(ValueError, match=match) as err:
        make(pipe, **options)
    assert "\n" not in str(err.value)


def test_search_first_optimises_from_the_best_of_n_noises(pipe):
    steps = []
    gen = make(pipe, iterations=4, search_first=5, reg_weight=0.0)
    result = gen.generate(Brightness(), seed=2, callback=lambda info: steps.append((info.step, info.total)))
    searched = result.info["search_first"]
    assert searched["renders"] == 5 and result.info["renderer_calls"] == 5 + 4
    assert steps == [(i, 9) for i in range(9)]                      # one progress: the search, then the steps
    assert result.losses[0] == pytest.approx(min(searched["losses"]), abs=1e-5)   # it starts from the best
    assert min(searched["losses"]) < searched["losses"][0]           # which was not the seed's own noise here
    plain = make(pipe, iterations=4, reg_weight=0.0).generate(Brightness(), seed=2)
    assert plain.losses[0] == pytest.approx(searched["losses"][0], abs=1e-5)


def test_a_stop_during_search_first_keeps_the_best_searched_noise(pipe):
    gen = make(pipe, iterations=4, search_first=5, reg_weight=0.0)
    result = gen.generate(Brightness(), seed=2, callback=lambda info: info.step < 2)     # stop at the third render
    searched = result.info["search_first"]
    assert result.stopped_at == 2 and searched["renders"] == 3 and result.info["renderer_calls"] == 3
    assert min(searched["best_loss"]) == pytest.approx(min(searched["losses"]), abs=1e-6)
    final = float(Brightness()(result.images).per_image[0])
    assert final == pytest.approx(min(searched["losses"]), abs=2e-3)                     # the image is that noise's
