"""Shared pieces of the benchmarks: real architectures with random weights, timing, memory.

Speed does not depend on weight values, so every benchmark builds the published
architectures from configs in code (no download) and fills them with random weights.

``CLIPSTEER_BENCH_TINY=1`` (set by ``benchmarks/gpu_check.sh --dry-run``) swaps every architecture for a
tiny one of the same kind (:func:`clip_arch`, :func:`taming_config`, the benchmarks' SD builders), so
the whole benchmark path runs on a CPU in seconds; its figures mean nothing.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent

# Published architecture hyper-parameters (OpenAI CLIP; taming imagenet f16 16384; SD 1.5).
CLIP_ARCHS = {
    "ViT-B/32": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        vision=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    patch_size=32, image_size=224),
        projection_dim=512),
    "ViT-B/16": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        vision=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                    patch_size=16, image_size=224),
        projection_dim=512),
    "ViT-L/14": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                    patch_size=14, image_size=224),
        projection_dim=768),
}

TAMING_F16_16384 = {
    "embed_dim": 256, "n_embed": 16384,
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                 "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                 "dropout": 0.0},
}


TINY = os.environ.get("CLIPSTEER_BENCH_TINY") == "1"
CACHE = Path(tempfile.gettempdir()) / ("clipsteer-bench-tiny" if TINY else "clipsteer-bench")

TINY_CLIP = dict(
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
    vision=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, patch_size=4,
                image_size=32),
    projection_dim=16)
TINY_TAMING = {
    "embed_dim": 8, "n_embed": 64,
    "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
}


def tests_module(name: str):
    """The test suite's helper module ``tests/<name>.py`` (``tiny``: tiny models and the CLIP tokenizer built
    in code; ``tiny_rewards``), imported from its file. ``tests/`` is no package and is not installed; the
    module is registered under its plain name, as the tests import it, so the helpers' own imports of each
    other (``from tiny import ...``) find it."""
    import importlib.util

    if name not in sys.modules:
        if name == "tiny_rewards":
            tests_module("tiny")
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def clip_arch(arch: str) -> dict:
    """The hyper-parameters of CLIP *arch* (a tiny CLIP under ``CLIPSTEER_BENCH_TINY``)."""
    return TINY_CLIP if TINY else CLIP_ARCHS[arch]


def taming_config() -> dict:
    """taming imagenet f16-16384 (a tiny f4 VQGAN under ``CLIPSTEER_BENCH_TINY``)."""
    return TINY_TAMING if TINY else TAMING_F16_16384


def clip_folder(arch: str, folder: Path) -> Path:
    """Save a random-weight CLIP of architecture *arch* with the real tokenizer into *folder*."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from toyworld.tokenizer import write_clip_tokenizer

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    spec = clip_arch(arch)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(spec["text"], vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(folder)
    size = spec["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of *fn* after *warmup* untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak RSS of this process (CPU) and, on CUDA, peak allocated GPU memory."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def environment(device: torch.device) -> dict[str, str]:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "diffusers": diffusers.__version__,
           "device": str(device), "threads": str(torch.get_num_threads()), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_isolated(script: Path, args: list[str], timeout: float | None = None) -> dict:
    """Run one benchmark case in a fresh process (so peak RSS is that case's) and parse its JSON line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "args": args}
    return json.loads(lines[-1])
