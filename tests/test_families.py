"""SDXL, SD3 and FLUX under the same guidance (issue 22): tiny pipelines built from configs (CPU, no download)
against the diffusers pipelines themselves."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_stable_diffusion import guided_and_plain_losses
from tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

from generators import get_generator
from generators.diffusion.families import FAMILIES, family_of, pipeline_class_of
from generators.diffusion.noise import NoiseGenerator, NoiseSettings
from generators.diffusion.tables import clean_estimate, flow_tables, renoise
from generators.diffusion.sampling import Settings, StableDiffusionGenerator
from guidance import CLIPLoss, Cutouts

PROMPT = "a red circle"
# family -> (tiny pipeline, our size options, the diffusers pipeline's call options for the same run)
FAMILY_CASES = {
    "sdxl": (tiny_sdxl_pipeline, {"scheduler": "euler"}, {"guidance_scale": 7.5}),
    "sdxl-turbo": (lambda: tiny_sdxl_pipeline(scheduler="EulerAncestralDiscreteScheduler"),
                   {"scheduler": "default", "cfg_scale": 0.0}, {"guidance_scale": 0.0}),
    "sd3": (tiny_sd3_pipeline, {}, {"guidance_scale": 7.5}),
    "flux-schnell": (tiny_flux_pipeline, {"width": 32, "height": 32}, {"width": 32, "height": 32}),
    "flux-dev": (lambda: tiny_flux_pipeline(guidance_embeds=True), {"width": 32, "height": 32, "flux_guidance": 3.5},
                 {"width": 32, "height": 32, "guidance_scale": 3.5}),
}


@pytest.fixture(scope="module")
def clip_loss(encoder):
    return CLIPLoss(encoder, PROMPT, cutouts=Cutouts(4, augmentations=[]))


@pytest.fixture(scope="module")
def pipes():
    built = {}

    def get(case):
        if case not in built:
            built[case] = FAMILY_CASES[case][0]()
        return built[case]

    return get


def make(pipe, case, **options):
    options = {"steps": 3, "prompt": PROMPT, "clip_guidance_scale": 500.0, **FAMILY_CASES[case][1], **options}
    return StableDiffusionGenerator(Settings(**options), device="cpu", pipeline=pipe)


def reference(pipe, case, seed, steps=3):
    return pipe(PROMPT, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(seed),
                **FAMILY_CASES[case][2]).images


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_zero_scale_is_the_diffusers_pipeline_and_guidance_changes_the_image(clip_loss, pipes, case):
    gen = make(pipes(case), case, clip_guidance_scale=0.0)
    plain = gen.generate(clip_loss, seed=3)
    assert plain.info["family"] == case.split("-")[0] and plain.info["guided_steps"] == []
    torch.testing.assert_close(plain.images, reference(gen.pipe, case, 3), rtol=0, atol=1e-5)
    gen.settings = dataclasses.replace(gen.settings, clip_guidance_scale=500.0)
    guided = gen.generate(clip_loss, seed=3)
    assert torch.isfinite(guided.images).all() and guided.images.shape == plain.images.shape
    assert len(guided.losses) == 3 and (guided.images - plain.images).abs().max() > 1e-2


@pytest.mark.parametrize("case, scale", [("sdxl", 1000.0), ("sd3", 1000.0), ("flux-schnell", 1000.0)])
def test_guidance_lowers_the_objective(clip_loss, pipes, case, scale):
    """Over seeds, guided final images score better on the guiding loss than unguided ones of the same seed."""
    gen = make(pipes(case), case, steps=4, num_images=2, clip_guidance_scale=scale)
    guided, plain = guided_and_plain_losses(gen, clip_loss, range(2))
    assert guided.mean() < plain.mean() - 0.005
    assert (guided < plain).float().mean() >= 0.75


# -- rectified flow: the clean estimate and the re-noising against the scheduler ------------------------------
def test_flow_clean_estimate_and_renoise_match_the_scheduler():
    """x0 = x_t - t v is what FlowMatchEulerDiscreteScheduler's stochastic step re-noises, and its plain step is
    x_{t'} = (1 - t') x0 + t' (x0 + v); our VP view (z, ab) gives the same x0, and renoise is the flow forward
    process x_t = (1-t)/(1-t') x_{t'} + sqrt(t^2 - ((1-t) t' / (1-t'))^2) eps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for stochastic in (False, True):
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
        sched.set_timesteps(4)
        tables = flow_tables(sched, sched.timesteps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=g)
        for i, t in enumerate(sched.timesteps):
            sigma, after = sched.sigmas[i], sched.sigmas[i + 1]
            v = torch.randn(x.shape, generator=g)
            z = x / tables.sample_scales[i]
            x0_model = x - sigma * v                                  # the family's clean estimate (a "sample")
            x0 = clean_estimate(z, x0_model, tables.alpha_bar(i), "sample")
            ab = ((1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)).clamp(min=1e-6)
            torch.testing.assert_close(tables.alpha_bar(i), ab.float())
            step = sched.step(v, t, x, generator=torch.Generator().manual_seed(i), return_dict=False)[0]
            if stochastic:
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
                expected = (1 - after) * x0 + after * noise
            else:
                expected = (1 - after) * x0 + after * (x0 + v)
            torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
            back = renoise(step, tables, i, torch.Generator().manual_seed(9))
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
            keep = (1 - sigma) / (1 - after)
            forward = keep * step + (sigma ** 2 - (keep * after) ** 2).clamp(min=0).sqrt() * eps
            torch.testing.assert_close(back, forward, rtol=1e-5, atol=1e-5)
            x = step


GUIDER_OPTIONS = {"clip": {"clip_guidance_scale": 500.0}, "dps": {"clip_guidance_scale": 50.0},
                  "mpgd": {"clip_guidance_scale": 50.0}, "freedom": {"clip_guidance_scale": 0.5},
                  "ugd": {"clip_guidance_scale": 500.0, "backward_steps": 1, "backward_lr": 20.0},
                  "tfg": {"clip_guidance_scale": 50.0, "backward_steps": 1, "backward_lr": 20.0, "smoothing": 0.05}}


@pytest.mark.parametrize("case", ["sdxl", "sd3", "flux-schnell"])
@pytest.mark.parametrize("guider", list(GUIDER_OPTIONS))
def test_every_guider_steers_every_family(clip_loss, pipes, case, guider):
    gen = make(pipes(case), case, steps=2, guider=guider, **GUIDER_OPTIONS[guider])
    guided = gen.generate(clip_loss, seed=1)
    plain = make(gen.pipe, case, steps=2, clip_guidance_scale=0.0).generate(clip_loss, seed=1)
    assert torch.isfinite(guided.images).all() and guided.info["guider"] == guider
    assert (guided.images - plain.images).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["sd3", "flux-schnell"])
def test_self_recurrence_with_flow_models(clip_loss, pipes, case):
    gen = make(pipes(case), case, steps=2, recurrence=2)
    once = make(gen.pipe, case, steps=2).generate(clip_loss, seed=0)
    twice = gen.generate(clip_loss, seed=0)
    assert twice.info["recurrence"] == 2 and torch.isfinite(twice.images).all()
    assert (twice.images - once.images).abs().max() > 1e-3


def test_flux_dev_takes_its_guidance_as_an_input(clip_loss, pipes):
    gen = make(pipes("flux-dev"), "flux-dev", clip_guidance_scale=0.0, flux_guidance=1.0)
    low = gen.generate(None, seed=0)
    assert low.info["flux_guidance"] == 1.0
    ref = gen.pipe(PROMPT, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0),
                   width=32, height=32, guidance_scale=1.0).images
    torch.testing.assert_close(low.images, ref, rtol=0, atol=1e-5)
    high = make(gen.pipe, "flux-dev", clip_guidance_scale=0.0, flux_guidance=5.0).generate(None, seed=0)
    assert (high.images - low.images).abs().max() > 1e-4


def test_vae_tiling_is_passed_through(clip_loss, pipes):
    gen = make(pipes("sd3"), "sd3", steps=2, vae_tiling=True)
    assert gen.pipe.vae.use_tiling
    gen = make(pipes("sd3"), "sd3", steps=2)
    assert not gen.pipe.vae.use_tiling


def test_a_tiny_vae_decodes_the_guidance_image_of_a_flow_model(clip_loss, pipes, tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd3")
    full = make(pipes("sd3"), "sd3", steps=2).generate(clip_loss, seed=0)
    tiny = make(pipes("sd3"), "sd3", steps=2, tiny_vae=str(tmp_path / "taesd3"))
    calls = []
    hook = tiny.tiny_vae.decoder.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    result = tiny.generate(clip_loss, seed=0)
    hook.remove()
    assert calls == [True, True] and len(result.losses) == 2 and torch.isfinite(result.images).all()
    assert (result.images - full.images).abs().max() > 1e-4       # the final image is the full VAE's, other steering


# -- loading: the family comes from the model ------------------------------------------------------------------
@pytest.mark.parametrize("case, expected", [("sdxl", "StableDiffusionXLPipeline"), ("sd3", "StableDiffusion3Pipeline"),
                                            ("flux-schnell", "FluxPipeline")])
def test_a_saved_folder_loads_as_its_own_family(clip_loss, pipes, tmp_path, case, expected):
    pipes(case).save_pretrained(tmp_path / case)
    assert pipeline_class_of(str(tmp_path / case), tmp_path / case, False) == expected
    options = {"sd_model": str(tmp_path / case), "steps": 2, "prompt": PROMPT, "clip_guidance_scale": 500.0,
               **FAMILY_CASES[case][1]}
    loaded = get_generator("sd", options, device="cpu")
    assert type(loaded.pipe).__name__ == expected and type(loaded.family) is FAMILIES[expected]
    in_memory = make(pipes(case), case, steps=2)
    torch.testing.assert_close(loaded.generate(clip_loss, seed=2).images, in_memory.generate(clip_loss, seed=2).images)


def test_single_file_checkpoints_are_recognised_by_their_keys(tmp_path):
    from safetensors.torch import save_file

    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(2)}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    assert pipeline_class_of("flux.safetensors", tmp_path / "flux.safetensors", True) == "FluxPipeline"
    xl = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}
    save_file(xl, str(tmp_path / "xl.safetensors"))
    assert pipeline_class_of("xl.safetensors", tmp_path / "xl.safetensors", True) == "StableDiffusionXLPipeline"
    torch.save({"state_dict": {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias":
                               torch.zeros(9216), "model.diffusion_model.pos_embed": torch.zeros(1, 36864, 1)}},
               tmp_path / "sd3.ckpt")
    assert pipeline_class_of("sd3.ckpt", tmp_path / "sd3.ckpt", True) == "StableDiffusion3Pipeline"
    refiner = {"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2)}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    with pytest.raises(ValueError, match=r"xl_refiner.*does not support; supported: StableDiffusionPipeline") as err:
        StableDiffusionGenerator(Settings(sd_model=str(tmp_path / "refiner.safetensors")), device="cpu")
    assert "\n" not in str(err.value)


def test_an_unsupported_family_is_named_with_the_supported_ones(tmp_path):
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError) as err:
        StableDiffusionGenerator(Settings(sd_model=str(tmp_path / "kandinsky")), device="cpu")
    message = str(err.value)
    assert "KandinskyV22Pipeline" in message and "\n" not in message
    with pytest.raises(ValueError, match="KandinskyV22Pipeline"):         # before anything loads
        StableDiffusionGenerator.check(Settings(sd_model=str(tmp_path / "kandinsky")))
    for name in FAMILIES:
        assert name in message


@pytest.mark.parametrize("options, message", [
    ({"scheduler": "ddim"}, r"--scheduler ddim is a DDPM sampler; SD3/3.5 is a rectified-flow model"),
])
def test_flow_family_errors_are_one_line(pipes, options, message):
    with pytest.raises(ValueError, match=message) as err:
        make(pipes("sd3"), "sd3", **options)
    assert "\n" not in str(err.value)


def test_family_of_a_pipeline_object(pipes):
    assert family_of(pipes("sdxl")).name == "sdxl" and family_of(pipes("flux-dev")).distilled_guidance
    with pytest.raises(ValueError, match="does not support"):
        family_of(object())


# -- the noise backend renders with SDXL-Turbo-like and FLUX-schnell-like pipelines ---------------------------------
class Redness(torch.nn.Module):
    """Lower is better: distance of the mean colour from red (differentiable)."""

    def forward(self, images, *, step=0, generator=None):
        from guidance import LossOutput

        target = torch.tensor([0.9, 0.2, 0.2]).view(1, 3)
        per_image = (images.clamp(0, 1).mean((2, 3)) - target).pow(2).sum(1)
        return LossOutput(total=per_image.sum(), per_image=per_image)

    def conditioning_text(self, step=0):
        return PROMPT


@pytest.mark.parametrize("case", ["sdxl-turbo", "flux-schnell"])
def test_noise_backend_optimises_the_noise_of_sdxl_turbo_and_flux_schnell(pipes, case):
    size = {k: v for k, v in FAMILY_CASES[case][1].items() if k in ("width", "height")}
    gen = NoiseGenerator(NoiseSettings(render_steps=1, iterations=6, learning_rate=5.0, cfg_scale=0.0, **size),
                         device="cpu", pipeline=pipes(case))
    result = gen.generate(Redness(), seed=0)
    assert torch.isfinite(result.images).all() and result.images.shape[-1] == (64 if case == "sdxl-turbo" else 32)
    assert min(result.losses) < result.losses[0]
    # one render of the starting noise is the diffusers pipeline's one-step image from that noise
    z = torch.randn(gen.latent_shape(), generator=torch.Generator().manual_seed(5))
    conditioning, _ = gen._embeddings(gen.pipe, Redness(), 1)
    render = gen.make_renderer(gen.pipe, gen.scheduler, conditioning, 1, seed=0)
    with torch.no_grad():
        mine = render(z).clamp(0, 1)
    ref = gen.pipe(PROMPT, num_inference_steps=1, output_type="pt", latents=z,   # the pipeline scales it itself
                   generator=torch.Generator().manual_seed(0), **FAMILY_CASES[case][2]).images
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
