"""Peak memory and time of one noise-optimisation step through an SD 2.1-sized model, with and without
gradient checkpointing through the UNet calls (issue 18). Random weights in the published architectures
(SD 2.1-base UNet and VAE, OpenCLIP ViT-H/14 text encoder), 512x512, batch 1; the objective is a cheap
mean-colour loss so the figures are the renderer's. Each configuration runs in a fresh process, so its
peak RSS (CPU) / peak allocated memory (CUDA) is its own.

    python benchmarks/noise_memory.py                          # render steps 1 and 4, with and without checkpointing
    python benchmarks/noise_memory.py --render-steps 1 --size 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import TINY, tests_module   # benchmarks/common.py: run as a script, its folder is on sys.path



def sd21_pipeline(size: int, device: str = "cpu"):
    """SD 2.1-base's UNet, VAE and OpenCLIP-H text encoder from their published configs, random weights."""
    import tempfile

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from toyworld.tokenizer import write_clip_tokenizer

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="trailing")
    if TINY:     # benchmarks/gpu_check.sh --dry-run
        tiny_sd_components = tests_module("tiny").tiny_sd_components
        return StableDiffusionPipeline(**{**tiny_sd_components(sample_size=size // 8), "scheduler": scheduler})
    torch.manual_seed(0)
    with torch.device(device):     # random weights made where they run (fast on a GPU)
        unet, vae, text = _sd21_models(size)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sd21_models(size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=size,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                        num_hidden_layers=23, projection_dim=1024, vocab_size=49408,
                                        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=0))
    return unet, vae, text


def one(args) -> dict:
    import torch

    from generators.diffusion.noise import NoiseGenerator, NoiseSettings
    from guidance import LossOutput, Objective

    class MeanColour(Objective):
        def forward(self, images, *, step=0, generator=None):
            per_image = (images.clamp(0, 1).mean((2, 3)) - 0.5).pow(2).sum(1)
            return LossOutput(total=per_image.sum(), per_image=per_image)

        def conditioning_text(self, step=0):
            return "a lighthouse at dusk"

    torch.set_num_threads(args.threads)
    pipe = sd21_pipeline(args.size, args.device)
    settings = NoiseSettings(render_steps=args.render_steps, iterations=args.iterations,
                             checkpointing=args.checkpointing, width=args.size, height=args.size)
    gen = NoiseGenerator(settings, device=args.device, pipeline=pipe)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    stamps = []
    t0 = time.perf_counter()
    gen.generate(MeanColour(), seed=0, callback=lambda info: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip([t0] + stamps, stamps)]
    out = {"render_steps": args.render_steps, "checkpointing": args.checkpointing, "size": args.size,
           "iterations": args.iterations, "seconds_per_step": steps, "rss_before_gb": round(before, 2),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
           "unet_params_m": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--render-steps", type=int, nargs="+", default=[1, 4])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iterations", type=int, default=1, help="optimisation steps per run (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.render_steps = args.render_steps[0]
        print(json.dumps(one(args)))
        return 0
    results = []
    for steps in args.render_steps:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--one", "--render-steps", str(steps), "--size", str(args.size),
                   "--iterations", str(args.iterations), "--threads", str(args.threads), "--device", args.device]
            cmd += ["--checkpointing"] if ckpt else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"render steps {steps}, checkpointing {'on ' if ckpt else 'off'}: peak RSS {row['peak_rss_gb']:.2f} GB "
                  f"(models {row['rss_before_gb']:.2f} GB), {row['seconds_per_step'][-1]:.1f} s per step", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
