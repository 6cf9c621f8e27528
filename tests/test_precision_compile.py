"""Mixed precision (autocast, fp32 master latents, fp16 loss scaling) and ``--compile``, on tiny models (CPU).

Tolerances: bf16 keeps 8 bits of mantissa (relative error 2**-8 = 0.4% per rounding); through the tiny
decoders and CLIP towers the loss stays within 2% of float32, the images within 0.05 (of [0, 1]; guided
Stable Diffusion and the noise backend's renderer, whose UNets run in bf16 too: 0.01 on average, 0.1 at most)
and the gradient to the latents keeps its direction (cosine above 0.97; CLIP embeddings: 0.99). Compiled modules must match eager ones to
float32 round-off (1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch

from generators.optimise import optimise
from generators.diffusion.tables import clip_gradient
from generators.diffusion.pipeline import decoder_dtype
from generators.diffusion.sampling import Settings, StableDiffusionGenerator
from generators.vqgan.taming import TamingConfig, build_first_stage
from generators.vqgan.backend import VQGANGenerator, VQGANSettings
from guidance import CLIPLoss, Cutouts
from guidance.runtime import set_compiled
from tiny import tiny_encoder, tiny_sd_pipeline, tiny_taesd, tiny_vqgan_config

PROMPT = "a red circle"


def half_encoder(encoder, dtype=torch.bfloat16):
    """The encoder as ``load_encoder(precision=...)`` builds it on the CPU: half weights, float32 mean/std,
    eager attention."""
    enc = copy.deepcopy(encoder)
    enc.model.to(dtype)
    enc.model.set_attn_implementation("eager")
    return enc


def clip_loss(encoder, n=4):
    return CLIPLoss(encoder, PROMPT, cutouts=Cutouts(n, min_fraction=0.6, augmentations=[]))


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)


@pytest.fixture(scope="module")
def vqgan_model():
    torch.manual_seed(0)
    return build_first_stage(TamingConfig.from_dict(tiny_vqgan_config()))


def vqgan_loss_and_grad(model, encoder, precision):
    gen = VQGANGenerator(VQGANSettings(width=32, height=32), model=model, precision=precision)
    z = gen.initial_latents(torch.Generator().manual_seed(0)).requires_grad_(True)
    images = gen.render(z)
    out = clip_loss(encoder)(images, generator=torch.Generator().manual_seed(1))
    out.total.backward()
    return images.detach(), out.total.detach(), z.grad


def test_bf16_vqgan_step_matches_fp32_and_reaches_the_latents(vqgan_model, encoder):
    images32, loss32, grad32 = vqgan_loss_and_grad(vqgan_model, encoder, "fp32")
    images16, loss16, grad16 = vqgan_loss_and_grad(vqgan_model, half_encoder(encoder), "bf16")
    assert images16.dtype == torch.float32 and grad16.dtype == torch.float32      # fp32 master latents
    torch.testing.assert_close(images16, images32, rtol=0, atol=0.05)
    torch.testing.assert_close(loss16, loss32, rtol=0.02, atol=0)
    assert torch.isfinite(grad16).all() and grad16.abs().sum() > 0
    assert cosine(grad16, grad32) > 0.97


def test_bf16_vqgan_run_lowers_the_loss(vqgan_model, encoder):
    gen = VQGANGenerator(VQGANSettings(width=32, height=32, iterations=12, learning_rate=0.2), model=vqgan_model,
                         precision="bf16")
    result = gen.generate(clip_loss(half_encoder(encoder)), seed=0)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3


def autocast_seen(module) -> list:
    """Records, at each call of *module*, the autocast dtype in force (``None``: autocast off)."""
    seen: list = []
    module.register_forward_pre_hook(
        lambda m, args: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    return seen


def test_bf16_encoder_runs_under_autocast(encoder):
    images = torch.rand(3, 3, 32, 32)
    ref = encoder.encode_image(images)
    half = half_encoder(encoder)
    seen = autocast_seen(half.image_tower)
    out = half.encode_image(images)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert (torch.nn.functional.cosine_similarity(out, ref) > 0.99).all()


@pytest.mark.parametrize("mode", ["x0", "full"])
def test_bf16_guided_sd_matches_fp32(encoder, mode):
    def run(precision, enc):
        gen = StableDiffusionGenerator(Settings(steps=3, prompt=PROMPT, scheduler="ddim", clip_guidance_scale=300.0,
                                                guidance_gradient=mode),
                                       device="cpu", precision=precision, pipeline=tiny_sd_pipeline())
        return gen.generate(clip_loss(enc), seed=0)

    ref, half = run("fp32", encoder), run("bf16", half_encoder(encoder))
    diff = (half.images - ref.images).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1, (float(diff.mean()), float(diff.max()))   # bf16 UNet too
    torch.testing.assert_close(torch.tensor(half.losses), torch.tensor(ref.losses), rtol=0.02, atol=0)


def test_bf16_guidance_decode_autocasts_and_the_gradient_keeps_its_direction(encoder):
    grads = {}
    for precision in ("fp32", "bf16"):
        gen = StableDiffusionGenerator(Settings(steps=3, prompt=PROMPT, scheduler="ddim"), device="cpu",
                                       precision=precision, pipeline=tiny_sd_pipeline())
        gen.tiny_vae = tiny_taesd()
        seen = autocast_seen(gen.tiny_vae.decoder)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        enc = encoder if precision == "fp32" else half_encoder(encoder)
        grads[precision], _ = clip_gradient(z, out, torch.tensor(0.5), "epsilon", decode=gen._guidance_decode,
                                            loss_fn=clip_loss(enc), step=0, generator=torch.Generator().manual_seed(2))
        assert seen == [None if precision == "fp32" else torch.bfloat16]
    assert grads["bf16"].dtype == torch.float32 and torch.isfinite(grads["bf16"]).all()
    assert cosine(grads["bf16"], grads["fp32"]) > 0.97


def test_bf16_noise_render_matches_fp32_and_the_gradient_keeps_its_direction(encoder):
    """The noise backend's renderer (bf16 UNet, VAE decode under autocast) against float32, through the CLIP
    loss, from the same starting noise."""
    from generators.diffusion.noise import NoiseGenerator, NoiseSettings

    out = {}
    for precision in ("fp32", "bf16"):
        gen = NoiseGenerator(NoiseSettings(render_steps=2, scheduler="ddim"), device="cpu", precision=precision,
                             pipeline=tiny_sd_pipeline())
        conditioning, _ = gen._embeddings(gen.pipe, clip_loss(encoder), 1)
        render = gen.make_renderer(gen.pipe, gen.scheduler, conditioning, 2, seed=0)
        z = torch.randn(gen.latent_shape(), generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        images = render(z)
        enc = encoder if precision == "fp32" else half_encoder(encoder)
        loss = clip_loss(enc)(images, generator=torch.Generator().manual_seed(1)).total
        loss.backward()
        out[precision] = images.detach(), loss.detach(), z.grad
    (im32, loss32, grad32), (im16, loss16, grad16) = out["fp32"], out["bf16"]
    assert im16.dtype == torch.float32 and grad16.dtype == torch.float32
    diff = (im16 - im32).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1, (float(diff.mean()), float(diff.max()))
    torch.testing.assert_close(loss16, loss32, rtol=0.02, atol=0)
    assert cosine(grad16, grad32) > 0.97


def test_bf16_clip_as_loaded_matches_fp32_on_vit_b32_shapes(tmp_path):
    """What ``load_encoder(precision="bf16")`` builds (matrix-product patch embedding, eager attention, bf16
    weights) on ViT-B/32's shapes (32-pixel patches of 224², 12 heads of 64; two layers, random weights):
    embeddings and the input gradient of a spherical loss close to float32's."""
    from transformers import CLIPConfig, CLIPModel

    from guidance import load_encoder, spherical_distance
    from tiny import clip_tokenizer_dir

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                         num_hidden_layers=1, vocab_size=49408, max_position_embeddings=77,
                                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                           num_hidden_layers=2, image_size=224, patch_size=32),
                        projection_dim=512)
    CLIPModel(config).save_pretrained(tmp_path)
    for f in clip_tokenizer_dir().iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    images = torch.rand(4, 3, 224, 224)
    target = torch.randn(1, 512)
    grads, embeddings = {}, {}
    for precision in ("fp32", "bf16"):
        enc = load_encoder(str(tmp_path), device="cpu", precision=precision)
        x = images.clone().requires_grad_(True)
        emb = enc.encode_image(x)
        spherical_distance(emb, target).sum().backward()
        grads[precision], embeddings[precision] = x.grad, emb.detach()
    assert torch.nn.functional.cosine_similarity(embeddings["bf16"], embeddings["fp32"]).min() > 0.99
    assert cosine(grads["bf16"], grads["fp32"]) > 0.97


def test_fp16_keeps_a_vae_that_asks_for_float32_in_float32():
    pipe = tiny_sd_pipeline()
    assert pipe.vae.config.force_upcast
    assert decoder_dtype(pipe.vae, torch.float16) == torch.float32
    assert decoder_dtype(pipe.vae, torch.bfloat16) == torch.bfloat16
    assert decoder_dtype(tiny_taesd(), torch.float16) == torch.float16


# -- fp16 loss scaling in the latent optimiser ---------------------------------------------------------------
def _square_fit(scaler, steps=4, start=None):
    target = torch.linspace(-1, 1, 8)
    z = (torch.zeros(8) if start is None else start.clone()).requires_grad_(True)
    seen = []

    class Fit:
        def __call__(self, images, **kw):
            from guidance import LossOutput

            per_image = (images.flatten(1) - target).pow(2).sum(1)
            return LossOutput(total=per_image.sum(), per_image=per_image)

    optimise(z, lambda v: v.view(1, 8), Fit(), lr=0.1, steps=steps, grad_scaler=scaler,
             callback=lambda info: seen.append(info.latents.detach().clone()))
    return z.detach(), seen


def test_grad_scaler_gives_the_unscaled_result():
    plain, _ = _square_fit(None)
    scaled, _ = _square_fit(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-6)
    assert not torch.equal(plain, torch.zeros(8))


def test_grad_scaler_skips_an_overflowing_step_and_lowers_its_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)   # scaled gradients overflow float32
    _, seen = _square_fit(scaler, steps=3)
    assert torch.equal(seen[0], torch.zeros(8)), "the overflowing step must not move the latents"
    assert scaler.get_scale() < 2.0 ** 127
    assert not torch.equal(seen[-1], torch.zeros(8)), "later steps at a lower scale do move them"


# -- --compile ------------------------------------------------------------------------------------------------
def _vqgan_run(model, encoder, iterations=3):
    gen = VQGANGenerator(VQGANSettings(width=32, height=32, iterations=iterations), model=model)
    return gen, gen.generate(clip_loss(encoder), seed=3)


def _check_compiled_matches_eager(model, encoder):
    eager = _vqgan_run(model, encoder)[1]
    gen = VQGANGenerator(VQGANSettings(width=32, height=32, iterations=3), model=model)
    modules = [encoder.image_tower, *gen.compile_targets()]
    set_compiled(modules, True)
    try:
        assert all(m._compiled_call_impl is not None for m in modules)
        compiled = gen.generate(clip_loss(encoder), seed=3)
    finally:
        set_compiled(modules, False)
    assert all(m._compiled_call_impl is None for m in modules)
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.images, eager.images, rtol=0, atol=1e-5)


def test_compile_matches_eager_traced(monkeypatch, vqgan_model):
    """Dynamo and AOT autograd trace the CLIP image tower and the decoder (graphs, backward) without code
    generation, which takes minutes on a CPU: the wiring and the traced numerics."""
    monkeypatch.setenv("CLIPSTEER_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    _check_compiled_matches_eager(vqgan_model, tiny_encoder(0))


@pytest.mark.slow
def test_compile_matches_eager_inductor(monkeypatch, vqgan_model):
    monkeypatch.delenv("CLIPSTEER_COMPILE_BACKEND", raising=False)
    torch._dynamo.reset()
    _check_compiled_matches_eager(vqgan_model, tiny_encoder(0))


def test_compile_option_reaches_the_models_and_is_undone():
    """``compile=True`` (``--compile``) compiles the guiding CLIP's image tower and the VQGAN decoder; the
    next run without it gets the same cached models back uncompiled (as the session prepares a run)."""
    from generators.runs.options import resolve_options
    from generators.runs.session import prepare

    def prepared(**extra):
        backend, opts, provenance = resolve_options(PROMPT, preset="toy", backend="vqgan", eval_model="none",
                                                    **extra)
        prep = prepare(backend, opts, provenance)
        return prep, [m for m in prep.objective.modules() if hasattr(m, "image_tower")]

    prep, encoders = prepared(compile=True)
    modules = [enc.image_tower for enc in encoders] + prep.generator.compile_targets()
    assert encoders and modules[-1] is prep.generator.model.decoder
    assert all(m._compiled_call_impl is not None for m in modules)
    assert prep.opts["compile"] is True
    again, _ = prepared()
    assert again.generator.model is prep.generator.model           # the cached models, uncompiled
    assert all(m._compiled_call_impl is None for m in modules)
