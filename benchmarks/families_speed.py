"""Seconds per guided step and peak memory of each diffusion family's real-size architecture (random weights).

SDXL base (UNet 2.6B), SD3 medium (MMDiT 2B) and FLUX.1 schnell (12B) are built from their published configs
in code (no download), each in its own process (so the peak RSS is that family's), at its native size, and one
``clip``-guided step (``--guidance-gradient x0``, CFG where the family uses it) runs through the ``sd``
backend's own loop: the denoiser's forward pass, the guidance decode (a TAESD-layout tiny VAE, as the README
recommends: the full VAE's backward at 1024 px needs tens of GB) and a random-weight CLIP ViT-B/32 with
``--cutn`` cutouts, forward and backward. Text encoders are left out: they run once per image, not per step
(random conditioning tensors of the real shapes stand in for their outputs). A family whose weights alone
would pass ``--max-gb`` is not built and is reported as not fitting, with its parameter count (counted on
the meta device). After the step the full VAE decodes the final latents (reported separately).

    nice -n 19 python benchmarks/families_speed.py --json benchmarks/results/families_cpu.json
    python benchmarks/families_speed.py --device cuda --precision bf16 --json benchmarks/results/families_gpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

# benchmarks/common.py: run as ``python benchmarks/families_speed.py``, this file's folder is first on sys.path
from common import ROOT, clip_folder, environment, run_isolated

CACHE = ROOT / "benchmarks" / ".cache"
PROMPT = "a fantasy castle, detailed"

# Published configs (diffusers folders of the Hub models named), written out here.
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32}
SD_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
              "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
              "norm_num_groups": 32}
SD3_TRANSFORMER = {  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192}
FLUX_TRANSFORMER = {  # black-forest-labs/FLUX.1-schnell transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}

FAMILIES = {
    "sdxl": {"label": "SDXL base 1.0", "size": 1024, "cfg": 5.0, "latent_channels": 4, "text_tokens": 77},
    "sd3": {"label": "SD3 medium", "size": 1024, "cfg": 7.0, "latent_channels": 16, "text_tokens": 77 + 256},
    "flux": {"label": "FLUX.1 schnell", "size": 1024, "cfg": 0.0, "latent_channels": 16, "text_tokens": 256},
}


def denoiser(family: str):
    from diffusers import (
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    if family == "sdxl":
        return UNet2DConditionModel(**SDXL_UNET)
    if family == "sd3":
        return SD3Transformer2DModel(**SD3_TRANSFORMER)
    return FluxTransformer2DModel(**FLUX_TRANSFORMER)


def parameter_count(family: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in denoiser(family).parameters())


def pipeline(family: str, dtype: torch.dtype):
    """The family's diffusers pipeline without text encoders; the denoiser is built directly in *dtype*."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
    )

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = denoiser(family).eval()
    finally:
        torch.set_default_dtype(default)
    if family == "sdxl":
        vae = AutoencoderKL(**SD_VAE, latent_channels=4, scaling_factor=0.13025)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=model, scheduler=scheduler, add_watermarker=False)
    vae = AutoencoderKL(**SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                        **({"scaling_factor": 1.5305, "shift_factor": 0.0609} if family == "sd3"
                           else {"scaling_factor": 0.3611, "shift_factor": 0.1159}))
    if family == "sd3":
        return StableDiffusion3Pipeline(transformer=model, vae=vae, text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(transformer=model, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, scheduler=scheduler)


def random_conditioning(gen, family: str, batch: int, device):
    """Random stand-ins, of the real shapes, for what the text encoders would give (``Family.encode``)."""
    from generators.diffusion.families import _conditioning

    g = torch.Generator().manual_seed(1)
    spec = FAMILIES[family]
    dtype = gen.family.denoiser.dtype

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    def one():
        if family == "sdxl":
            ids = torch.tensor([[spec["size"], spec["size"], 0, 0, spec["size"], spec["size"]]] * batch)
            return {"encoder_hidden_states": rand(batch, 77, 2048),
                    "added_cond_kwargs": {"text_embeds": rand(batch, 1280), "time_ids": ids.to(device, dtype)}}
        if family == "sd3":
            return {"encoder_hidden_states": rand(batch, spec["text_tokens"], 4096),
                    "pooled_projections": rand(batch, 2048)}
        h = w = spec["size"] // 16
        return {"encoder_hidden_states": rand(batch, spec["text_tokens"], 4096), "pooled_projections": rand(batch, 768),
                "txt_ids": torch.zeros(spec["text_tokens"], 3, device=device),
                "img_ids": gen.pipe._prepare_latent_image_ids(batch, h, w, device, dtype)}

    cfg = gen.family.uses_cfg(gen.settings.cfg_scale)
    return _conditioning(one(), one() if cfg else None)


def tiny_vae_folder(latent_channels: int) -> Path:
    from diffusers import AutoencoderTiny

    folder = CACHE / f"taesd-layout-{latent_channels}ch"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderTiny(latent_channels=latent_channels).save_pretrained(folder)   # TAESD's layout, random weights
    return folder


def run_family(args) -> dict:
    from generators.diffusion.sampling import Settings, StableDiffusionGenerator
    from guidance import CLIPLoss, Cutouts, load_encoder, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    family, spec = args.family, FAMILIES[args.family]
    dtype = resolve_dtype(args.precision, device)
    params = parameter_count(family)
    weights_gb = params * torch.finfo(dtype).bits / 8 / 1e9
    out = {"family": family, "model": spec["label"], "denoiser_params_b": round(params / 1e9, 3),
           "precision": str(dtype).replace("torch.", ""), "size": spec["size"], "device": str(device),
           "denoiser_weights_gb": round(weights_gb, 2)}
    if device.type == "cpu" and weights_gb > args.max_gb:
        out["skipped"] = (f"the denoiser's weights alone are {weights_gb:.1f} GB in {out['precision']}, over the "
                          f"{args.max_gb} GB this run may use")
        return out
    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipe = pipeline(family, dtype)
    encoder = load_encoder(str(clip_folder("ViT-B/32", CACHE / "clip-vit-b-32")), device=device)
    loss = CLIPLoss(encoder, PROMPT, cutouts=Cutouts(args.cutn))
    settings = Settings(sd_model=f"(random {spec['label']} architecture)", steps=1, prompt=PROMPT,
                        cfg_scale=spec["cfg"], clip_guidance_scale=100.0, tiny_vae=str(tiny_vae_folder(
                            spec["latent_channels"])), width=spec["size"], height=spec["size"])
    gen = StableDiffusionGenerator(settings, device=device, precision=args.precision, pipeline=pipe)
    gen.family.encode = lambda *a, **k: random_conditioning(gen, family, 1, device)
    out["models_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    stamps = []

    def callback(info):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    result = gen.generate(loss, seed=0, callback=callback)
    end = time.perf_counter()
    out.update({"seconds_per_guided_step": round(stamps[0] - start, 2),
                "final_vae_decode_s": round(end - stamps[0], 2), "cfg": gen.family.uses_cfg(spec["cfg"]),
                "cutn": args.cutn, "threads": torch.get_num_threads(), "finite": bool(torch.isfinite(result.images).all()),
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)})
    if device.type == "cuda":
        out["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=list(FAMILIES), action="append",
                   help="run only these (repeatable; default: all, one process each, one after another)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--cutn", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-gb", type=float, default=12.0, help="CPU: skip a family whose denoiser weights pass this")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # the worker process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_family(argparse.Namespace(**{**vars(args), "family": args.family[0]}))), flush=True)
        return
    results = []
    for family in args.family or list(FAMILIES):
        extra = ["--device", args.device, "--cutn", str(args.cutn), "--threads", str(args.threads),
                 "--max-gb", str(args.max_gb)] + (["--precision", args.precision] if args.precision else [])
        row = run_isolated(Path(__file__), ["--one", "--family", family, *extra])
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "environment":
                                         environment(torch.device(args.device)), "results": results}, indent=1))


if __name__ == "__main__":
    main()
