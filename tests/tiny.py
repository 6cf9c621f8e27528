"""Tiny models built from configs in code, with no download (as diffusers' tests do)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from toyworld.tokenizer import write_clip_tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / ".cache" / "clip_tokenizer"


@functools.lru_cache(maxsize=None)
def clip_tokenizer_dir() -> Path:
    """The real CLIP BPE tokenizer files, written once per test session from open_clip's vocabulary."""
    if not (TOKENIZER_DIR / "merges.txt").exists():
        write_clip_tokenizer(TOKENIZER_DIR)
    return TOKENIZER_DIR


def tiny_clip_model(seed: int = 0, image_size: int = 32, projection_dim: int = 16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=4),
        projection_dim=projection_dim,
    )
    return CLIPModel(config).eval()


def save_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A complete CLIP folder (model, tokenizer, image processor) as a Hub download would be."""
    import shutil

    from transformers import CLIPImageProcessor

    folder = Path(folder)
    tiny_clip_model(seed, image_size).save_pretrained(folder)
    for f in clip_tokenizer_dir().iterdir():
        shutil.copy(f, folder / f.name)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def tiny_encoder(seed: int = 0, image_size: int = 32):
    from transformers import CLIPTokenizer

    from guidance import HFCLIPEncoder

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    return HFCLIPEncoder(tiny_clip_model(seed, image_size), tokenizer, name=f"tiny-clip-{seed}")


# -- Stable Diffusion ----------------------------------------------------------------------------
# Stable Diffusion 1.x's noise schedule (what its model_index ships in scheduler_config.json).
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True,
                           steps_offset=1, clip_sample=False, timestep_spacing="leading")


def tiny_sd_components(seed: int = 0, *, prediction_type: str = "epsilon", sample_size: int = 8) -> dict:
    """Tiny UNet / AutoencoderKL (8x down, as SD's) / CLIP text encoder / real CLIP tokenizer / PNDM
    scheduler, built from configs the way diffusers' ``get_dummy_components()`` does.
    Images are ``sample_size * 8`` pixels square; pass to ``StableDiffusionPipeline(**components)``."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=sample_size * 8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir())
    scheduler = PNDMScheduler.from_config({**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False)


def tiny_sd_pipeline(seed: int = 0, **kwargs):
    """A ``StableDiffusionPipeline`` over :func:`tiny_sd_components` (CPU, float32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(folder: Path, seed: int = 0, **kwargs) -> Path:
    """A complete diffusers pipeline folder (safetensors weights), as a Hub download would be."""
    folder = Path(folder)
    tiny_sd_pipeline(seed, **kwargs).save_pretrained(folder)
    return folder


def tiny_taesd(seed: int = 0):
    """A tiny ``AutoencoderTiny`` (TAESD layout: 4 latent channels, 8x up) for the tiny SD latents."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                           latent_channels=4).eval()


# --- tiny taming VQGAN (issue 3) ----------------------------------------------------------------

def tiny_vqgan_config(gumbel: bool = False, n_embed: int = 64, embed_dim: int = 8) -> dict:
    """A taming-layout VQGAN config (f4: ch_mult [1, 1, 2]) small enough for CPU tests."""
    params = {
        "embed_dim": embed_dim, "n_embed": n_embed,
        "ddconfig": {"double_z": False, "z_channels": embed_dim, "resolution": 32, "in_channels": 3,
                     "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
                     "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0}},
    }
    target = "taming.models.vqgan.VQModel"
    if gumbel:
        target = "taming.models.vqgan.GumbelVQ"
        params["kl_weight"] = 1e-8
        params["temperature_scheduler_config"] = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                                                  "params": {"warm_up_steps": 0, "lr_start": 0.9}}
    return {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}


def tiny_vqgan_state(seed: int = 0, gumbel: bool = False) -> dict:
    """Random first-stage weights (codebook spread like a trained one) plus ``loss.*`` keys."""
    from generators.vqgan.taming import TamingConfig, build_first_stage

    torch.manual_seed(seed)
    model = build_first_stage(TamingConfig.from_dict(tiny_vqgan_config(gumbel)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "quantize.embed.weight" if gumbel else "quantize.embedding.weight"
    state[key] = torch.randn_like(state[key])
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    return state


def save_tiny_vqgan(folder: Path, seed: int = 0, gumbel: bool = False, fmt: str = "ckpt",
                    extra: dict | None = None) -> Path:
    """A folder with ``config.yaml`` and ``last.ckpt`` saved as taming/Lightning does (state_dict with
    ``loss.*`` keys, OmegaConf hyper-parameters, global_step...), or ``model.safetensors``."""
    import yaml
    from omegaconf import OmegaConf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_vqgan_config(gumbel)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    state = tiny_vqgan_state(seed, gumbel)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("loss.")},
                  str(folder / "model.safetensors"))
        return folder
    checkpoint = {
        "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
        "state_dict": state,
        "hyper_parameters": OmegaConf.create(config["model"]["params"]),
        "callbacks": {"ModelCheckpoint": {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.1)}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
        "lr_schedulers": [],
    }
    checkpoint.update(extra or {})
    torch.save(checkpoint, folder / "last.ckpt")
    return folder


# --- tiny SDXL, SD3 and FLUX pipelines (issue 22) -------------------------------------------------------

def tiny_t5_tokenizer():
    """A tiny T5 tokenizer built in code (a Unigram vocabulary of letters, digits and punctuation, with
    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as T5's), so T5 text encoders run with no download."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny_t5_encoder(seed: int = 0, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tiny_t5_tokenizer()), d_model=d_model, d_ff=37, d_kv=8, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _tiny_clip_text(projection: bool, seed: int, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407, projection_dim=projection_dim, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir())


def tiny_sdxl_pipeline(seed: int = 0, *, sample_size: int = 8, scheduler: str = "EulerDiscreteScheduler"):
    """A ``StableDiffusionXLPipeline``: a UNet with SDXL's ``text_time`` addition embeddings, a CLIP text
    encoder and a CLIP text encoder with projection (as SDXL's two), the tiny 8x VAE; ``sample_size * 8`` px."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    sd = tiny_sd_components(seed, sample_size=sample_size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=4)
    config = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    pipe = StableDiffusionXLPipeline(
        vae=sd["vae"], text_encoder=_tiny_clip_text(False, seed + 1), text_encoder_2=_tiny_clip_text(True, seed + 2),
        tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=unet.eval(),
        scheduler=getattr(diffusers, scheduler).from_config(config), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_flow_vae(seed: int, latent_channels: int, blocks: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,) * blocks, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                         latent_channels=latent_channels, norm_num_groups=4, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_sd3_pipeline(seed: int = 0, *, sample_size: int = 16):
    """A ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel``, two CLIP text encoders with projection and
    a tiny T5, a 2x VAE and ``FlowMatchEulerDiscreteScheduler``; images ``sample_size * 2`` px square."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), vae=_tiny_flow_vae(seed, 4, 2),
        text_encoder=_tiny_clip_text(True, seed + 1, hidden=16), tokenizer=_clip_tokenizer(),
        text_encoder_2=_tiny_clip_text(True, seed + 2, hidden=16), tokenizer_2=_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed + 3), tokenizer_3=tiny_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = False):
    """A ``FluxPipeline``: a ``FluxTransformer2DModel`` (``guidance_embeds``: as FLUX.1-dev, else schnell), a
    CLIP text encoder and a tiny T5, a 2x VAE with 4 latent channels (packed 2x2 to 16);
    ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting as FLUX's. Pass 32x32 px."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=transformer.eval(), vae=_tiny_flow_vae(seed, 4, 2),
                        text_encoder=_tiny_clip_text(False, seed + 1), tokenizer=_clip_tokenizer(),
                        text_encoder_2=tiny_t5_encoder(seed + 3), tokenizer_2=tiny_t5_tokenizer(),
                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
