"""Layout sketch (SDEdit from the prompt's layout): the sketch itself, both backends against diffusers'
img2img pipeline, and its effect on the toy SD."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from generators.diffusion.families import family_of
from generators.diffusion.layout_sketch import layout_sketch, subject_colours
from generators.diffusion.noise import NoiseGenerator, NoiseSettings
from generators.diffusion.sampling import Settings, StableDiffusionGenerator
from tiny import tiny_sd_pipeline

RELATION = "a red circle to the left of a blue square on a green background"


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def test_the_sketch_paints_each_subject_in_its_colour_inside_its_box():
    pixels = np.asarray(layout_sketch("auto", RELATION, 64, 48)).astype(int)
    assert pixels.shape == (48, 64, 3)
    assert abs(pixels[24, 16] - (255, 0, 0)).max() <= 1          # the left box's centre: the circle's red
    assert abs(pixels[24, 48] - (0, 0, 255)).max() <= 1          # the right box's centre: the square's blue
    assert (pixels[0, 0] == (0, 128, 0)).all() and (pixels[47, 63] == (0, 128, 0)).all()   # CSS green background
    above = np.asarray(layout_sketch("auto", "a yellow cross above a black square", 64, 64)).astype(int)
    assert abs(above[16, 32] - (255, 255, 0)).max() <= 1 and abs(above[48, 32]).max() <= 1
    assert (above[0, 0] == 128).all()                            # no background named: grey
    # subjects without a colour word are grey blobs; boxes given by hand are used as given
    plain = np.asarray(layout_sketch("circle:0,0,0.5,0.5;square:0.5,0.5,1,1", "a circle and a square on a white "
                                     "background", 64, 64)).astype(int)
    assert abs(plain[16, 16] - 128).max() <= 1 and abs(plain[48, 48] - 128).max() <= 1 and (plain[48, 16] == 255).all()
    assert subject_colours("a navy cat and a dog") == {"cat": (0, 0, 128), "dog": (128, 128, 128)}
    assert layout_sketch("auto", "three red squares on a green background", 64, 64) is None   # one subject


def test_the_sd_backend_starts_from_the_sketch_as_diffusers_img2img_would(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    options = {"steps": 6, "prompt": RELATION, "scheduler": "default", "clip_guidance_scale": 0.0}
    ours = StableDiffusionGenerator(Settings(**options, layout_sketch="auto", strength=0.5), device="cpu",
                                    pipeline=pipe).generate(None, seed=0)
    assert ours.info["num_steps"] < 6 and ours.info["layout_sketch"] == "auto"     # img2img: the last steps only
    reference = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(RELATION, image=layout_sketch("auto", RELATION, 64, 64), strength=0.5, num_inference_steps=6,
                       output_type="pt", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours.images, theirs, rtol=0, atol=1e-5)
    plain = StableDiffusionGenerator(Settings(**options), device="cpu", pipeline=pipe).generate(None, seed=0)
    assert (plain.images - ours.images).abs().max() > 1e-3 and "layout_sketch" not in plain.info


def test_the_noise_renderer_noises_the_sketch_with_the_optimised_noise_as_img2img(pipe):
    """render(z) from the sketch = diffusers' img2img given the sketch's latents and drawing z as its noise; the
    gradient reaches z."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    gen = NoiseGenerator(NoiseSettings(render_steps=4, scheduler="ddim", cfg_scale=3.0, layout_sketch="auto",
                                       strength=0.5), device="cpu", pipeline=pipe)
    start = gen.sketch_latents(pipe, RELATION)
    assert start.shape == (1, 4, 8, 8)
    conditioning = family_of(pipe).encode(RELATION, "", 1, True, "cpu", height=64, width=64)
    render = gen.make_renderer(pipe, gen.scheduler, conditioning, 4, seed=0, start=start)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
    ours = render(z)
    ours.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    reference = StableDiffusionImg2ImgPipeline(**{**pipe.components,
                                                  "scheduler": DDIMScheduler.from_config(gen.scheduler.config)},
                                               requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(RELATION, image=start, strength=0.5, num_inference_steps=4, guidance_scale=3.0,
                       output_type="pt", generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(ours.detach().clamp(0, 1), theirs, rtol=1e-5, atol=1e-5)


def test_the_toy_sd_draws_each_subject_in_its_sketched_box():
    """On the toy SD, the best-of-N search from the sketch of "X to the left of Y" renders every candidate with
    X's colour left of Y's (measured on the pixels nearest each palette colour)."""
    from generators.runs import generate
    from toyworld.paths import weights_dir
    from toyworld.world import PALETTE

    prompt = "a red circle to the left of a blue square on a white background"
    images = []
    generate(prompt, backend="noise", preset="toy", seed=0, save=False, progress=False, eval_model="none",
             sd_model=str(weights_dir("sd")), render_steps=10, scheduler="ddim", cfg_scale=5.0, method="best-of-n",
             budget=4, layout_sketch="auto", strength=0.7,
             callback=lambda info: images.append(info.decode()))
    palette = torch.tensor([PALETTE[c] for c in ("red", "blue", "white")], dtype=torch.float32) / 255
    for image in torch.cat(images):
        nearest = (image.permute(1, 2, 0)[..., None, :] - palette).pow(2).sum(-1).argmin(-1)   # [H, W]
        columns = torch.arange(image.shape[-1], dtype=torch.float32).expand_as(nearest)
        red, blue = columns[nearest == 0], columns[nearest == 1]
        assert len(red) > 50 and len(blue) > 50 and red.mean() + 10 < blue.mean()


@pytest.mark.parametrize("options, match", [
    ({"layout_sketch": "circle:0,0,2,1"}, "--layout part"),
    ({"layout_sketch": "auto", "init_image": "x.png"}, "drop one"),
])
def test_bad_sketches_fail_in_one_line_before_loading(options, match):
    from generators.diffusion.sampling import _check_settings

    with pytest.raises(ValueError, match=match) as err:
        _check_settings(Settings(**options), torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_noise_backend_sketch_errors_are_one_line(pipe):
    for options, match in (({"layout_sketch": "auto", "strength": 0.1, "render_steps": 4}, "leaves no render step"),
                           ({"layout_sketch": "auto", "step_noises": True, "render_steps": 2}, "drop one")):
        with pytest.raises(ValueError, match=match) as err:
            NoiseGenerator(NoiseSettings(scheduler="ddim", **options), device="cpu", pipeline=pipe)
        assert "\n" not in str(err.value)
