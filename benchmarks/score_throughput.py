#!/usr/bin/env python
"""CLIP-score throughput: clipsteer vs torchmetrics 1.9 ``CLIPScore`` on the same model and images.

Both score the same random 8-bit images against the same captions with the same CLIP
architecture (ViT-B/32 or ViT-L/14 built from its published config, random weights: speed does
not depend on weight values; nothing is downloaded) at the same batch size, in one run, with
the methods interleaved round by round so machine load hits them alike. torchmetrics is timed
both ways people use it: ``metric(images, captions)`` (forward) and ``update()`` + ``compute()``.
The scores are compared too (max abs difference of the final means and of per-pair scores).

    .venv/bin/python benchmarks/score_throughput.py --arch ViT-B/32 --images 96 --json out.json

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# benchmarks/common.py: run as ``python benchmarks/score_throughput.py``, this file's folder is first on sys.path
from common import CLIP_ARCHS as ARCHS  # published OpenAI CLIP hyper-parameters
from common import clip_arch, tests_module

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "cross"]
PLACES = ["on a grey background", "in a forest", "at night", "on a beach", "in the snow", "under water"]


def build_clip(arch: str, seed: int = 0):
    """A CLIPModel of the published *arch* with random weights, as ``from_pretrained`` would return it."""
    from transformers import CLIPConfig, CLIPModel

    spec = clip_arch(arch)
    config = CLIPConfig(
        text_config=dict(**spec["text"], vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(**spec["vision"]), projection_dim=spec["projection_dim"])
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def captions_for(n: int, per_caption: int) -> list[str]:
    out = []
    for i in range(n):
        k = i // per_caption
        out.append(f"a {COLOURS[k % 8]} {SHAPES[(k // 8) % 4]} {PLACES[(k // 32) % 6]}, picture {k}")
    return out


def _speedups(rate: dict[str, float]) -> dict[str, float]:
    return {
        "clipsteer_forward_vs_torchmetrics_forward": round(rate["clipsteer_forward"] / rate["torchmetrics_forward"], 2),
        "clipsteer_update_vs_torchmetrics_update": round(
            rate["clipsteer_update_compute"] / rate["torchmetrics_update_compute"], 2),
        "clip_score_vs_torchmetrics_update": round(rate["clipsteer_clip_score"] / rate["torchmetrics_update_compute"], 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="ViT-B/32", choices=sorted(ARCHS))
    ap.add_argument("--images", type=int, default=96, help="number of random images (default 96)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--per-caption", type=int, default=1,
                    help="images per caption (1: every caption unique; 4: four seeds per prompt)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (methods interleaved; median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both metrics score on it)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchmetrics
    import transformers
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore as TMCLIPScore
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    from guidance.encoders import HFCLIPEncoder
    from guidance.score import CLIPScore, ScoreModel, TorchmetricsCLIP, clip_score

    tokenizer = CLIPTokenizer.from_pretrained(tests_module("tiny").clip_tokenizer_dir())
    from guidance import resolve_device

    device = resolve_device(args.device)
    side = clip_arch(args.arch)["vision"]["image_size"]
    # OpenAI CLIP's: shortest edge 224, centre crop 224, bicubic
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    with torch.device(device):        # random weights made where they run (fast on a GPU)
        clip = build_clip(args.arch)
    tm_clip = copy.deepcopy(clip)  # torchmetrics gets its own copy, parameters as from_pretrained leaves them
    ours = ScoreModel(HFCLIPEncoder(clip, tokenizer, name=args.arch, mean=image_processor.image_mean,
                                    std=image_processor.image_std).to(device), image_processor, name=args.arch)
    make_tm = lambda: TMCLIPScore(model_name_or_path=lambda: (TorchmetricsCLIP(tm_clip),  # noqa: E731
                                                              CLIPProcessor(image_processor, tokenizer))).to(device)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=g, dtype=torch.uint8).to(device)
    caps = captions_for(args.images, args.per_caption)
    bs = args.batch_size
    batches = [(images[i:i + bs], caps[i:i + bs]) for i in range(0, args.images, bs)]

    # each returns (the metric's mean score, the unclamped mean of 100*cos)
    def tm_forward(bl):
        m = make_tm()
        for x, c in bl:
            m(x, c)
        return float(m.compute()), float(m.score / m.n_samples)

    def tm_update(bl):
        m = make_tm()
        for x, c in bl:
            m.update(x, c)
        return float(m.compute()), float(m.score / m.n_samples)

    def cs_forward(bl):
        ours.clear_cache()  # no text embeddings carried over from an earlier round
        m = CLIPScore(ours, batch_size=bs)
        for x, c in bl:
            m(x, c)
        return float(m.compute()), m.score_sum[ours.name] / m.count

    def cs_update(bl):
        ours.clear_cache()
        m = CLIPScore(ours, batch_size=bs)
        for x, c in bl:
            m.update(x, c)
        return float(m.compute()), m.score_sum[ours.name] / m.count

    def cs_function(bl):
        ours.clear_cache()
        per_pair = clip_score(torch.cat([x for x, _ in bl]), [t for _, c in bl for t in c], model=ours,
                              batch_size=bs, reduction="none")
        return max(float(per_pair.double().mean()), 0.0), float(per_pair.double().mean())

    methods = {"torchmetrics_forward": tm_forward, "torchmetrics_update_compute": tm_update,
               "clipsteer_forward": cs_forward, "clipsteer_update_compute": cs_update,
               "clipsteer_clip_score": cs_function}
    # warm-up: one batch each (allocator, thread pools, lazy imports)
    for fn in methods.values():
        fn(batches[:1])
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu_times: dict[str, list[float]] = {k: [] for k in methods}  # less sensitive to other users' load
    values: dict[str, tuple[float, float]] = {}
    names = list(methods)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            values[name] = methods[name](batches)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s wall, {cpu_times[name][-1]:.2f} s CPU",
                  file=sys.stderr, flush=True)

    with torch.no_grad():
        ref_pairs = torch.cat([_clip_score_update(x, c, TorchmetricsCLIP(tm_clip), CLIPProcessor(image_processor, tokenizer))[0]
                               for x, c in batches]).double().cpu()
    ours.clear_cache()
    our_pairs = clip_score(images, caps, model=ours, batch_size=bs, reduction="none").double().cpu()
    results = {k: {"seconds": [round(t, 3) for t in v], "median_s": round(statistics.median(v), 3),
                   "images_per_s": round(args.images / statistics.median(v), 3),
                   "cpu_seconds": [round(t, 3) for t in cpu_times[k]],
                   "images_per_cpu_s": round(args.images / statistics.median(cpu_times[k]), 3)}
               for k, v in times.items()}
    ips = {k: v["images_per_s"] for k, v in results.items()}
    ipc = {k: v["images_per_cpu_s"] for k, v in results.items()}
    report = {
        "benchmark": "score_throughput", "arch": args.arch, "weights": "random (published config)",
        "device": str(device), "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "images": args.images, "image_size": args.size, "batch_size": bs, "images_per_caption": args.per_caption,
        "unique_captions": len(set(caps)), "rounds": args.rounds,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torchmetrics": torchmetrics.__version__},
        "results": results,
        "speedup_wall": _speedups(ips),
        "speedup_cpu_time": _speedups(ipc),
        "scores": {k: round(v[0], 6) for k, v in values.items()},
        "unclamped_mean_100cos": {k: round(v[1], 6) for k, v in values.items()},
        "max_abs_diff_mean": max(abs(v[0] - values["torchmetrics_update_compute"][0]) for v in values.values()),
        "max_abs_diff_unclamped_mean": max(abs(v[1] - values["torchmetrics_update_compute"][1])
                                           for v in values.values()),
        "max_abs_diff_per_pair": float((ref_pairs - our_pairs).abs().max()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
