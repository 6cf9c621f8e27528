"""Speed and memory of clipsteer's hot loops, next to a plain baseline of the same work.

Each case runs in a fresh process (so its peak RSS is its own), after warm-up, and reports
the median seconds per iteration. Results go to stdout as JSON and to ``--json FILE``.

    python benchmarks/speed.py                       # CPU defaults: clip-loss and vqgan at 128
    python benchmarks/speed.py --cases vqgan --sizes 128 256 --repeats 5
    python benchmarks/speed.py --cases sd --sizes 256
    python benchmarks/speed.py --device cuda --cases vqgan sd --sizes 512

Cases (``--impl clipsteer`` is the library; ``--impl baseline`` the straightforward
formulation: one encode per cutout, text re-encoded each step, fp32 throughout):
- ``clip-loss``: one CLIPLoss forward+backward on one image, ViT-B/32, 32 cutouts, Af Pe Ji Er.
- ``vqgan``: one VQGAN+CLIP iteration, taming f16-16384 + ViT-B/32, 32 cutouts, Adam.
- ``sd``: one CLIP-guided and one plain Stable Diffusion step (SD 1.5 UNet/VAE, ViT-B/32
  guide, 4 cutouts), with the full VAE or the tiny autoencoder decoding the guidance image.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, clip_folder, environment, peak_memory_mb, run_isolated, summary,  # noqa: E402
                    time_calls)

CACHE = Path(tempfile.gettempdir()) / "clipsteer-bench"
PROMPT = "a lighthouse at dusk, oil painting"
AUGS = ["affine", "perspective", "jitter", "erasing"]


# -- clip-loss -------------------------------------------------------------------------
def _baseline_clip_loss(encoder, image, prompt, cutn, generator):
    """Straightforward formulation: text re-encoded, each cutout cropped, augmented and encoded alone."""
    from guidance import build_augmentations, spherical_distance

    text = encoder.encode_text([prompt])
    augs = build_augmentations(AUGS)
    size = encoder.input_size
    _, _, h, w = image.shape
    losses = []
    for _ in range(cutn):
        side = int(min(h, w))
        ox = int(torch.randint(0, w - side + 1, (), generator=generator))
        oy = int(torch.randint(0, h - side + 1, (), generator=generator))
        cut = image[:, :, oy:oy + side, ox:ox + side]
        cut = (F.adaptive_avg_pool2d(cut, size) + F.adaptive_max_pool2d(cut, size)) / 2
        for aug in augs:
            cut = aug(cut)
        losses.append(spherical_distance(encoder.encode_image(cut), text))
    return torch.stack(losses).mean()


def case_clip_loss(args, device) -> dict:
    from guidance import CLIPLoss, Cutouts, load_encoder

    encoder = load_encoder(str(clip_folder("ViT-B/32", CACHE / "clip-vit-b-32")), device=device,
                           precision=args.precision)
    image = torch.rand(1, 3, args.size, args.size, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    if args.impl == "clipsteer":
        loss_fn = CLIPLoss(encoder, PROMPT, cutouts=Cutouts(args.cutn, augmentations=AUGS))

        def step():
            loss_fn(image, generator=gen).total.backward()
    else:
        def step():
            _baseline_clip_loss(encoder, image, PROMPT, args.cutn, gen).backward()
    times = time_calls(step, warmup=args.warmup, repeats=args.repeats, device=device)
    return {"case": "clip-loss", "impl": args.impl, "size": args.size, "cutn": args.cutn, **summary(times)}


CASES = {"clip-loss": case_clip_loss}


def run_case(args) -> None:
    from guidance import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)
    result = CASES[args.case](args, device)
    result.update(peak_memory_mb(device))
    result["precision"] = args.precision or "fp32"
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["clip-loss", "vqgan"], help="cases to run (default: %(default)s)")
    parser.add_argument("--impls", nargs="+", default=["clipsteer", "baseline"], help="implementations to compare")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128], help="image sizes (square)")
    parser.add_argument("--cutn", type=int, default=32, help="cutouts per iteration (sd uses 4)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--precision", default=None, help="fp32 (default), bf16 or fp16 (clipsteer only)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return run_case(args)

    results = []
    for case in args.cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        for size in args.sizes:
            for impl in args.impls:
                cmd = ["--case", case, "--impl", impl, "--size", str(size), "--cutn", str(args.cutn),
                       "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--device", args.device]
                if args.precision and impl == "clipsteer":
                    cmd += ["--precision", args.precision]
                res = run_isolated(Path(__file__), cmd)
                print(json.dumps(res), file=sys.stderr)
                results.append(res)
    for case in args.cases:
        for size in args.sizes:
            rows = {r.get("impl"): r for r in results if r.get("case") == case and r.get("size") == size}
            if "clipsteer" in rows and "baseline" in rows and "median_s" in rows["clipsteer"]:
                rows["clipsteer"]["speedup_vs_baseline"] = rows["baseline"]["median_s"] / rows["clipsteer"]["median_s"]
    report = {"environment": environment(torch.device(args.device if args.device != "auto" else "cpu")),
              "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
