"""Attention steering (Attend-and-Excite, layout guidance) against diffusers' pipeline and by its effect."""
from __future__ import annotations

import pytest
import torch

from generators.diffusion.attend_excite import subject_token_indices, subject_words
from generators.diffusion.cross_attention import default_attention_res, record_cross_attention
from generators.diffusion.layout_guidance import auto_layout, parse_layout
from generators.diffusion.sampling import Settings, StableDiffusionGenerator
from tiny import tiny_sd_pipeline

PROMPT = "a red circle and a blue square"


def make(pipe, **options):
    options = {"steps": 12, "prompt": PROMPT, "scheduler": "default", "clip_guidance_scale": 0.0, **options}
    return StableDiffusionGenerator(Settings(**options), device="cpu", pipeline=pipe)


def test_subjects_are_read_from_the_prompt():
    assert subject_words("a red circle to the left of a blue square on a green background") == ["circle", "square"]
    assert subject_words("three purple crosses on a black background") == ["crosses"]
    assert subject_words("a cat, a dog and a bird") == ["cat", "dog", "bird"]
    pipe = tiny_sd_pipeline()
    tok = pipe.tokenizer
    assert subject_token_indices(tok, PROMPT) == [3, 7]
    assert subject_token_indices(tok, PROMPT, ["square"]) == [7]
    assert subject_token_indices(tok, PROMPT, ["3"]) == [3]
    with pytest.raises(ValueError, match="not a word of the prompt"):
        subject_token_indices(tok, PROMPT, ["triangle"])


@pytest.mark.parametrize("steps, ours_extra, theirs_extra", [
    (12, {}, {"token_indices": [3, 7]}),
    # every option reaches the rule: the subject, the excited steps, the refinement steps and the map resolution
    (6, {"subject_tokens": "square", "excite_steps": 3, "excite_thresholds": "1:0.3", "attention_res": 4},
     {"token_indices": [7], "max_iter_to_alter": 3, "thresholds": {1: 0.3}}),
])
def test_attend_and_excite_equals_the_diffusers_pipeline(steps, ours_extra, theirs_extra):
    """Same components, seed and settings: clipsteer's images equal StableDiffusionAttendAndExcitePipeline's."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    pipe = tiny_sd_pipeline()
    res = default_attention_res(pipe.unet, 8)
    gen = make(pipe, steps=steps, attend_excite=True, excite_scale=200.0, **ours_extra)
    ours = gen.generate(None, seed=4)
    assert ours.info["attend_excite"]["token_indices"] == theirs_extra["token_indices"]
    keys = {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor"}
    ref = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in pipe.components.items() if k in keys},
                                                 requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, num_inference_steps=steps, output_type="pt", scale_factor=200, attn_res=(res, res),
                 generator=torch.Generator().manual_seed(4), **theirs_extra).images
    plain = make(pipe, steps=steps).generate(None, seed=4).images
    assert (plain - theirs).abs().max() > 1e-3          # the method changes the image
    torch.testing.assert_close(ours.images, theirs, rtol=0, atol=1e-5)


def test_attend_and_excite_raises_the_weakest_subjects_attention():
    pipe = tiny_sd_pipeline()
    res = default_attention_res(pipe.unet, 8)
    ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]

    def weakest_peak(latents):
        with torch.no_grad(), record_cross_attention(pipe.unet, res) as store:
            pipe.unet(latents, 981, encoder_hidden_states=cond)
        maps = torch.softmax(store.maps()[..., 1:-1] * 100, -1)
        return min(float(maps[..., i - 1].max()) for i in (3, 7))

    from generators.diffusion.attend_excite import attend_excite_loss, excite, step_sizes

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss(zz):
        with record_cross_attention(pipe.unet, res) as store:
            pipe.unet(zz, 981, encoder_hidden_states=cond)
        return attend_excite_loss(store.maps(), [3, 7])

    moved, after = excite(z, 0, loss, sizes=step_sizes(10, 500.0), excite_steps=1, thresholds={0: 0.9})
    assert weakest_peak(moved) > 1.1 * weakest_peak(z)
    assert float(after) < float(loss(z).detach())


def test_layout_guidance_moves_attention_into_the_boxes():
    pipe = tiny_sd_pipeline()
    gen = make(pipe, steps=8, layout="circle:0,0,0.5,1;square:0.5,0,1,1", layout_scale=3000.0, layout_steps=8,
               layout_threshold=0.0)
    gen.generate(None, seed=1)     # builds and runs it end to end
    from generators.diffusion.attention_steering import SteeringContext
    from generators.diffusion.layout_guidance import LayoutGuidance

    ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    context = SteeringContext(unet=pipe.unet, tokenizer=pipe.tokenizer, prompt=PROMPT, latent_size=(8, 8),
                              num_steps=10, alpha_bars=lambda i: torch.tensor(0.1))
    method = LayoutGuidance.from_settings(gen.settings, context)
    conditional = lambda zz: pipe.unet(zz, 901, encoder_hidden_states=cond.repeat(2, 1, 1)).sample
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = method.loss(z, conditional).detach()
    after = method.loss(method.correct(0, z, conditional), conditional).detach()
    assert (after < before - 1e-3).all()


def test_layouts_parse_and_bad_ones_fail_in_one_line():
    assert auto_layout("a red circle to the left of a blue square") == [
        ("circle", (0.0, 0.15, 0.5, 0.85)), ("square", (0.5, 0.15, 1.0, 0.85))]
    assert [w for w, _ in auto_layout("a cross and a triangle on a red background")] == ["cross", "triangle"]
    assert parse_layout("cat:0,0,0.5,0.5", "a cat") == [("cat", (0.0, 0.0, 0.5, 0.5))]
    for bad in ("cat:0,0,0.5", "cat:0.5,0,0.2,1", ":0,0,1,1"):
        with pytest.raises(ValueError, match="WORD:x0,y0,x1,y1"):
            parse_layout(bad, "a cat")
    assert auto_layout("a red circle on a blue background") == []


# -- composable prompts ------------------------------------------------------------------------------------
def test_composable_step_equals_the_community_rule():
    """One step: eps_u + sum_i w_i (eps_i - eps_u), each part a batch-1 UNet pass as in the community
    pipeline (``composable_stable_diffusion.py``, its part weights = cfg * clipsteer's part weights)."""
    pipe = tiny_sd_pipeline()
    gen = make(pipe, prompt="a red circle | a blue square:0.5", composable=True, cfg_scale=7.5)
    conditioning = gen._encode(gen.settings.prompt, None, True, torch.device("cpu"))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = gen._denoiser(torch.tensor(501), conditioning)(z)

    def embed(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    with torch.no_grad():
        eps = {text: pipe.unet(z, torch.tensor(501), encoder_hidden_states=embed(text)).sample
               for text in ("", "a red circle", "a blue square")}
    ref = eps[""] + 7.5 * (eps["a red circle"] - eps[""]) + 3.75 * (eps["a blue square"] - eps[""])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_one_part_composable_is_plain_cfg_and_bad_weights_fail():
    pipe = tiny_sd_pipeline()
    plain = make(pipe, steps=4).generate(None, seed=2).images
    one = make(pipe, steps=4, composable=True).generate(None, seed=2).images
    torch.testing.assert_close(one, plain, rtol=0, atol=1e-6)
    two = make(pipe, steps=4, composable=True, prompt="a red circle|a blue square").generate(None, seed=2).images
    assert (two - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="sum to"):
        make(pipe, steps=4, composable=True, prompt="a red circle:1|a blue square:-1").generate(None, seed=2)
    with pytest.raises(ValueError, match="no CFG"):
        make(pipe, steps=4, composable=True, cfg_scale=1.0).generate(None, seed=2)


def test_layout_options_reach_the_method():
    from generators.diffusion.attention_steering import SteeringContext
    from generators.diffusion.layout_guidance import LayoutGuidance

    pipe = tiny_sd_pipeline()
    gen = make(pipe, layout="square:0.5,0,1,1", layout_scale=7.0, layout_steps=2, layout_iterations=3,
               layout_threshold=0.05, attention_res=4)
    context = SteeringContext(unet=pipe.unet, tokenizer=pipe.tokenizer, prompt=PROMPT, latent_size=(8, 8),
                              num_steps=4, alpha_bars=lambda i: torch.tensor(0.5))
    method = LayoutGuidance.from_settings(gen.settings, context)
    assert (method.scale, method.steps, method.iterations, method.threshold, method.res) == (7.0, 2, 3, 0.05, 4)
    assert [positions for positions, _ in method.subjects] == [[7]]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    conditional = lambda zz: pipe.unet(zz, 901, encoder_hidden_states=cond).sample
    assert torch.equal(method.correct(2, z, conditional), z)            # past --layout-steps: unchanged
    method.correct(0, z, conditional)
    assert 1 <= len(method.losses) <= 3                                  # at most --layout-iterations moves
