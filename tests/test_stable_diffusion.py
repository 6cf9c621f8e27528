"""The ``sd`` backend on tiny Stable Diffusion components built from configs (CPU, no download)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from generators import get_generator
from generators.diffusion.guiders import guided_steps
from generators.diffusion.tables import (clean_estimate, clip_gradient, noise_tables, output_correction)
from generators.diffusion.pipeline import SCHEDULERS
from generators.diffusion.sampling import Settings, StableDiffusionGenerator
from guidance import CLIPLoss, Cutouts, image_prompts, parse_prompts
from tiny import save_tiny_sd, tiny_sd_components, tiny_sd_pipeline, tiny_taesd

PROMPT = "a red circle"
ALL_SCHEDULERS = list(SCHEDULERS)
needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                 reason="diffusers' LMS scheduler needs scipy")


def scheduler_param(name):
    return pytest.param(name, marks=needs_scipy) if name == "lms" else name


@pytest.fixture(scope="module")
def clip_loss(encoder):
    return CLIPLoss(encoder, PROMPT, cutouts=Cutouts(4, augmentations=[]))


def make(pipe=None, *, prediction_type="epsilon", **options):
    options = {"steps": 3, "prompt": PROMPT, "scheduler": "ddim", "clip_guidance_scale": 500.0, **options}
    pipe = pipe if pipe is not None else tiny_sd_pipeline(prediction_type=prediction_type)
    return StableDiffusionGenerator(Settings(**options), device="cpu", pipeline=pipe)


def reference(pipe, seed, steps, **kwargs):
    """Plain diffusers sampling with the same components, scheduler, seed and steps."""
    return pipe(PROMPT, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def final_loss(clip_loss, images):
    """The guiding loss of finished images, with one fixed set of cutouts."""
    with torch.no_grad():
        return clip_loss(images, generator=torch.Generator().manual_seed(0)).per_image


def guided_and_plain_losses(gen, clip_loss, seeds):
    """The guiding loss of the final images of *gen* for each seed, guided and unguided (same seeds)."""
    guided = [final_loss(clip_loss, gen.generate(clip_loss, seed=seed).images) for seed in seeds]
    plain = [final_loss(clip_loss, gen.generate(None, seed=seed).images) for seed in seeds]
    return torch.cat(guided), torch.cat(plain)


# -- the scheduler-agnostic math ----------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", scheduler_param("lms")])
def test_clean_estimate_matches_the_schedulers_own(name, prediction_type):
    """Noise level read from scale_model_input / alphas_cumprod gives the x0 each scheduler computes itself."""
    gen = make(prediction_type=prediction_type, scheduler=name, steps=5)
    sched = type(gen.pipe.scheduler).from_config(gen.pipe.scheduler.config, timestep_spacing="linspace")
    sched.set_timesteps(5)
    timesteps = sched.timesteps
    tables = noise_tables(sched, timesteps)
    assert tables.sigma_frame == (name != "ddim") and len(tables) == len(timesteps)
    assert getattr(sched, "step_index", None) is None        # built from tables, the scheduler's state untouched
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g) * sched.init_noise_sigma
    for i, t in enumerate(timesteps):
        z = sched.scale_model_input(latents, t)
        out = torch.randn(latents.shape, generator=g)
        ab = tables.alpha_bar(i)
        assert torch.allclose(ab, tables.alpha_bar(i))          # the same step can be evaluated twice
        if tables.sigma_frame:
            assert torch.allclose(ab, 1 / (1 + sched.sigmas[i] ** 2))
            c_in = sched.scale_model_input(torch.ones(()), t)   # the scheduler's own scaling at this step
            assert torch.allclose(ab, c_in.float() ** 2)
        else:
            assert torch.allclose(ab, sched.alphas_cumprod[int(t)])
        extra = {"generator": torch.Generator().manual_seed(i)} if name == "euler_a" else {}
        step = sched.step(out, t, latents, **extra)
        mine = clean_estimate(z, out, ab, prediction_type)
        torch.testing.assert_close(mine, step.pred_original_sample, rtol=1e-4, atol=1e-4)
        latents = step.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_output_correction_moves_the_clean_estimate(prediction_type):
    g = torch.Generator().manual_seed(1)
    z, out, d_eps = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
    ab = torch.tensor(0.3)
    before = clean_estimate(z, out, ab, prediction_type)
    after = clean_estimate(z, out + output_correction(d_eps, ab, prediction_type), ab, prediction_type)
    torch.testing.assert_close(after - before, -((1 - ab) / ab).sqrt() * d_eps)


def test_guided_step_window():
    assert guided_steps(10) == list(range(10))
    assert guided_steps(10, start=0.2, end=0.8, every=2) == [2, 4, 6]
    assert guided_steps(8, start=0.25, end=0.75, every=3) == [2, 5]
    assert guided_steps(3, start=0.5, end=0.6) == []


@pytest.mark.parametrize("mode", ["x0", "full"])
def test_clip_gradient_matches_finite_differences(clip_loss, mode):
    """The gradient reaches the latents and is the derivative of the guidance loss (x0: UNet held fixed)."""
    gen = make()
    pipe = gen.pipe
    t = torch.tensor(500)
    ab = pipe.scheduler.alphas_cumprod[500]
    cond, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    unet = lambda zz: pipe.unet(zz, t, encoder_hidden_states=cond).sample
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    out = unet(z).detach()
    loss_fn = lambda images, step, generator: clip_loss(images, generator=torch.Generator().manual_seed(5))
    # inside (0, 1) smoothly, so the objective's clamp never acts and the loss is differentiable
    decode = lambda x0: torch.sigmoid(pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample)
    model = unet if mode == "full" else None
    grad, loss = clip_gradient(z, out, ab, "epsilon", decode=decode, loss_fn=loss_fn, step=0,
                               generator=None, model=model)
    assert grad.shape == z.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(loss.total)

    def f(zz):
        with torch.no_grad():
            if mode == "full":
                x0 = clean_estimate(zz, unet(zz), ab, "epsilon")
            else:
                v = (out - (1 - ab).sqrt() * z) / ab.sqrt()          # eps -> v at the base point, held fixed
                x0 = ab.sqrt() * zz - (1 - ab).sqrt() * v
            return loss_fn(decode(x0), 0, None).total

    direction = grad / grad.norm()
    h = 1e-2
    numeric = (f(z + h * direction) - f(z - h * direction)) / (2 * h)
    assert numeric.item() == pytest.approx(grad.norm().item(), rel=0.05)


# -- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [scheduler_param(n) for n in ALL_SCHEDULERS])
def test_every_scheduler_guides_and_zero_scale_is_plain_diffusers(clip_loss, name):
    gen = make(scheduler=name)
    guided = gen.generate(clip_loss, seed=3)
    images = guided.images
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert guided.info["guided_steps"] == list(range(guided.info["num_steps"]))
    assert len(guided.losses) == guided.info["num_steps"] and all(map(lambda v: v == v, guided.losses))

    gen.settings = dataclasses.replace(gen.settings, clip_guidance_scale=0.0)
    plain = gen.generate(clip_loss, seed=3)
    assert plain.info["guided_steps"] == [] and plain.losses == []
    assert (plain.images - images).abs().max() > 1e-3
    torch.testing.assert_close(plain.images, reference(gen.pipe, 3, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guidance_lowers_the_clip_loss(clip_loss, prediction_type):
    """Over several seeds, the guided final images score better on the guiding loss than unguided ones."""
    gen = make(prediction_type=prediction_type, steps=6, num_images=2, clip_guidance_scale=1000.0)
    guided, plain = guided_and_plain_losses(gen, clip_loss, range(3))
    assert guided.mean() < plain.mean() - 0.005
    assert (guided < plain).float().mean() >= 0.8


def test_v_prediction_zero_scale_is_plain_diffusers(clip_loss):
    gen = make(prediction_type="v_prediction", scheduler="euler", clip_guidance_scale=0.0)
    assert gen.pipe.scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(gen.generate(clip_loss, seed=1).images, reference(gen.pipe, 1, 3), rtol=0, atol=1e-6)


def test_window_and_every_choose_the_guided_steps(clip_loss):
    seen = []
    gen = make(steps=8, guidance_start=0.25, guidance_end=0.75, guidance_every=2)
    result = gen.generate(clip_loss, seed=0, callback=lambda info: seen.append((info.step, info.loss is not None)))
    assert result.info["guided_steps"] == [2, 4]
    assert seen == [(i, i in (2, 4)) for i in range(8)]
    assert len(result.losses) == 2
    everything = make(gen.pipe, steps=8).generate(clip_loss, seed=0)
    assert everything.info["guided_steps"] == list(range(8))
    assert (everything.images - result.images).abs().max() > 1e-3


def test_x0_mode_never_runs_the_unet_with_gradients(clip_loss):
    calls = []
    pipe = tiny_sd_pipeline()
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append((torch.is_grad_enabled(), len(args[0]))))
    make(pipe, steps=4, cfg_scale=7.5).generate(clip_loss, seed=0)
    assert calls == [(False, 2)] * 4                       # one CFG pass (uncond + cond) per step
    calls.clear()
    full = make(pipe, steps=4, guidance_gradient="full", guidance_every=2).generate(clip_loss, seed=0)
    # A guided step runs the conditional half once, with gradients, and only the unconditional half without.
    assert calls == [(True, 1), (False, 1), (False, 2), (True, 1), (False, 1), (False, 2)]
    assert full.info["guidance_gradient"] == "full"
    assert not any(p.requires_grad for p in pipe.unet.parameters())


@pytest.mark.parametrize("cfg_scale", [1.0, 7.5])
def test_full_mode_reuses_the_conditional_pass_without_changing_cfg(clip_loss, cfg_scale):
    """With a vanishing CLIP scale, "full" sampling is plain diffusers sampling: the reused text-conditional
    output enters CFG exactly as the pipeline's own batched pass would."""
    gen = make(steps=3, guidance_gradient="full", clip_guidance_scale=1e-9, cfg_scale=cfg_scale)
    result = gen.generate(clip_loss, seed=4)
    assert result.info["guided_steps"] == [0, 1, 2]
    torch.testing.assert_close(result.images, reference(gen.pipe, 4, 3, guidance_scale=cfg_scale),
                               rtol=0, atol=1e-5)


def test_seeds_reproduce_with_an_ancestral_scheduler(clip_loss):
    gen = make(scheduler="euler_a")
    a, b = gen.generate(clip_loss, seed=7).images, gen.generate(clip_loss, seed=7).images
    assert torch.equal(a, b)
    assert (gen.generate(clip_loss, seed=8).images - a).abs().max() > 1e-3


def test_batch_and_conditioning_prompt_from_clip_prompts(encoder, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    prompts = parse_prompts("a blue square:1|blurry:-1") + image_prompts([f"{tmp_path / 'red.png'}:0.5"])
    loss = CLIPLoss(encoder, prompts, cutouts=Cutouts(2, augmentations=[]))
    gen = make(prompt="", num_images=2, clip_guidance_scale=100.0)
    result = gen.generate(loss, seed=0)
    assert result.images.shape == (2, 3, 64, 64)
    assert (result.images[0] - result.images[1]).abs().max() > 1e-3
    assert result.info["prompt"] == "a blue square"


def test_callback_can_stop_early(clip_loss):
    frames = []

    def callback(info):
        frames.append(info.decode())
        return info.step < 1

    gen = make(steps=5)
    result = gen.generate(clip_loss, seed=0, callback=callback)
    assert not result.interrupted and result.stopped_at == 1 and len(frames) == 2 and result.steps_done == 2
    assert frames[0].shape == (1, 3, 64, 64) and 0 <= frames[0].min() and frames[0].max() <= 1
    torch.testing.assert_close(result.images, frames[-1])

    def ctrl_c(info):
        if info.step == 2:
            raise KeyboardInterrupt

    stopped = gen.generate(clip_loss, seed=0, callback=ctrl_c)
    assert stopped.interrupted and stopped.steps_done == 3 and torch.isfinite(stopped.images).all()


def test_img2img_strength_sets_the_steps_and_matches_diffusers(clip_loss, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    path = tmp_path / "init.png"
    pixels = torch.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    gen = make(steps=6, init_image=str(path), strength=0.5)
    steps = []
    guided = gen.generate(clip_loss, seed=0, callback=lambda info: steps.append(info.step))
    assert guided.info["num_steps"] == 3 and steps == [0, 1, 2]
    assert make(gen.pipe, steps=6, init_image=str(path), strength=1.0).generate(clip_loss, seed=0).info["num_steps"] == 6

    gen.settings = dataclasses.replace(gen.settings, clip_guidance_scale=0.0)
    plain = gen.generate(None, seed=0).images
    img2img = StableDiffusionImg2ImgPipeline(**gen.pipe.components)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    ref = img2img(PROMPT, image=image, strength=0.5, num_inference_steps=6, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(plain, ref, rtol=0, atol=1e-5)
    assert (guided.images - plain).abs().max() > 1e-3


def test_loads_a_saved_pipeline_folder_and_tiny_vae(clip_loss, tmp_path):
    folder = save_tiny_sd(tmp_path / "sd")
    tiny_taesd().save_pretrained(tmp_path / "taesd")
    gen = get_generator("sd", {"sd_model": str(folder), "steps": 3, "scheduler": "euler", "prompt": PROMPT,
                               "clip_guidance_scale": 500.0, "width": None}, device="cpu")
    assert isinstance(gen, StableDiffusionGenerator) and (gen.width, gen.height) == (64, 64)
    in_memory = make(tiny_sd_pipeline(), scheduler="euler")
    torch.testing.assert_close(gen.generate(clip_loss, seed=2).images, in_memory.generate(clip_loss, seed=2).images)

    tiny = make(scheduler="euler", tiny_vae=str(tmp_path / "taesd"))
    result = tiny.generate(clip_loss, seed=2)
    assert torch.isfinite(result.images).all() and len(result.losses) == 3
    assert (result.images - in_memory.generate(clip_loss, seed=2).images).abs().max() > 1e-4


def test_a_reused_pipeline_forgets_the_previous_runs_choices(clip_loss, tmp_path):
    """Runs share one loaded pipeline; scheduler and slicing of one run never leak into the next."""
    from guidance.cache import MODELS

    folder = save_tiny_sd(tmp_path / "sd")
    options = {"sd_model": str(folder), "steps": 3, "prompt": PROMPT, "clip_guidance_scale": 500.0, "width": None}
    first = get_generator("sd", {**options, "scheduler": "euler"}, device="cpu")
    assert first.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the default
    expected = first.generate(clip_loss, seed=3).images
    other = get_generator("sd", {**options, "scheduler": "ddim", "attention_slicing": True, "vae_slicing": True},
                          device="cpu")
    assert other.pipe is first.pipe and len(MODELS.keys("pipeline")) == 1
    assert type(other.pipe.scheduler).__name__ == "DDIMScheduler" and other.pipe.vae.use_slicing
    other.generate(clip_loss, seed=3)
    default = get_generator("sd", {**options, "scheduler": "default"}, device="cpu")
    assert type(default.pipe.scheduler).__name__ == "PNDMScheduler"   # what the folder was saved with
    assert not default.pipe.vae.use_slicing
    again = get_generator("sd", {**options, "scheduler": "euler"}, device="cpu")
    torch.testing.assert_close(again.generate(clip_loss, seed=3).images, expected, rtol=0, atol=0)


def test_memory_options_keep_the_images(clip_loss):
    base = make(steps=2, num_images=2).generate(clip_loss, seed=0).images
    lean = make(steps=2, num_images=2, vae_slicing=True, vae_tiling=True, attention_slicing=True,
                channels_last=False)
    assert lean.pipe.vae.decoder.conv_in.weight.is_contiguous()
    torch.testing.assert_close(lean.generate(clip_loss, seed=0).images, base, rtol=0, atol=1e-4)


def test_bf16_unet_keeps_guidance_in_float32(clip_loss):
    gen = StableDiffusionGenerator(Settings(steps=2, scheduler="ddim", prompt=PROMPT, clip_guidance_scale=500.0),
                                   device="cpu", precision="bf16", pipeline=tiny_sd_pipeline())
    assert gen.pipe.unet.dtype == torch.bfloat16 and gen.pipe.vae.dtype == torch.float32
    result = gen.generate(clip_loss, seed=0)
    assert torch.isfinite(result.images).all() and result.images.dtype == torch.float32


def test_settings_follow_the_convention():
    allowed = {int, float, str, bool, "int", "float", "str", "bool", "str | None", "list[str]",
               "float | None", "int | None"}   # None: the guider's own default (generators.diffusion.guiders.defaults)
    for f in dataclasses.fields(Settings):
        assert f.metadata.get("help"), f.name
        assert f.type in allowed, (f.name, f.type)
    flags = {f.name: f.metadata.get("flag") for f in dataclasses.fields(Settings)}
    assert flags["sd_model"] == "--sd" and flags["clip_guidance_scale"] == "--clip-guidance-scale"


# -- errors ---------------------------------------------------------------------------------------------------
def test_unsupported_schedulers_fail_at_set_up():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        make(scheduler="heun")
    pipe = tiny_sd_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="no DDPM noise schedule"):
        make(pipe, scheduler="default")
    pipe.scheduler = DDIMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="predicts 'flow'"):
        make(pipe, scheduler="default")


@pytest.mark.parametrize("options, message", [
    ({"width": 60}, r"width 60 is not a positive multiple of 8.*--width 56 or 64"),
    ({"height": 100}, r"height 100 is not a positive multiple of 8"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance window"),
    ({"guidance_every": 0}, "guidance_every"),
    ({"guidance_gradient": "exact"}, "choose x0, full, community"),
    ({"cpu_offload": True}, "--cpu-offload needs a CUDA device"),
    ({"steps": 0}, "steps is 0"),
])
def test_bad_settings_give_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as err:
        make(**options)
    assert "\n" not in str(err.value)


def test_img2img_errors(tmp_path):
    from PIL import Image

    with pytest.raises(FileNotFoundError):
        make(init_image=str(tmp_path / "missing.png"))
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="leaves no denoising step"):
        make(init_image=str(tmp_path / "a.png"), strength=0.1, steps=3)


def test_missing_models_give_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionGenerator(Settings(sd_model=str(tmp_path / "nowhere")), device="cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint file"):
        StableDiffusionGenerator(Settings(sd_model=str(tmp_path / "model.safetensors")), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        StableDiffusionGenerator(Settings(sd_model=str(tmp_path / "empty")), device="cpu")
    with pytest.raises(FileNotFoundError, match="tiny VAE folder"):
        make(tiny_vae=str(tmp_path / "no_taesd"))


def test_unreachable_hub_model_names_the_model(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"could not load Stable Diffusion model 'someone/no-such-model'.*hf download"):
        StableDiffusionGenerator(Settings(sd_model="someone/no-such-model"), device="cpu")


def test_mismatched_tiny_vae_is_refused(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="2x upsampling"):
        make(tiny_vae=str(tmp_path / "t"))


def test_vae_option_replaces_the_models_vae(clip_loss, tmp_path):
    """``--vae FOLDER`` (e.g. the SDXL fp16-fix VAE) loads that AutoencoderKL in place of the model's own."""
    folder = save_tiny_sd(tmp_path / "sd")
    tiny_sd_components(seed=7)["vae"].save_pretrained(tmp_path / "other_vae")
    options = {"sd_model": str(folder), "steps": 3, "scheduler": "euler", "prompt": PROMPT,
               "clip_guidance_scale": 0.0, "width": None}
    own = get_generator("sd", options, device="cpu")
    swapped = get_generator("sd", {**options, "vae": str(tmp_path / "other_vae")}, device="cpu")
    replacement = tiny_sd_components(seed=7)["vae"].state_dict()
    for name, value in swapped.pipe.vae.state_dict().items():
        torch.testing.assert_close(value, replacement[name])
    assert (swapped.generate(None, seed=1).images - own.generate(None, seed=1).images).abs().max() > 1e-3
    with pytest.raises(FileNotFoundError, match="VAE folder") as err:
        get_generator("sd", {**options, "vae": str(tmp_path / "missing_vae")}, device="cpu")
    assert "\n" not in str(err.value)
