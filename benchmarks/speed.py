"""Speed and memory of clipsteer's hot loops, next to a plain baseline of the same work.

Each case runs in a fresh process (so its peak RSS is its own), after warm-up, and reports
the median seconds per iteration. Results go to stdout as JSON and to ``--json FILE``.

    python benchmarks/speed.py                       # CPU defaults: clip-loss and vqgan at 128
    python benchmarks/speed.py --cases vqgan --sizes 128 256 --repeats 5
    python benchmarks/speed.py --cases sd --sizes 256
    python benchmarks/speed.py --device cuda --cases vqgan sd --sizes 512 --precision bf16

Implementations (``--impls``): ``clipsteer`` is the library; ``compiled`` the library with ``--compile``
(``torch.compile`` of the CLIP image tower and the decoder; the warm-up steps, which compile, are not
timed), so eager and compiled run in the same invocation and ``compile_speedup`` is their ratio;
``interleaved`` one run whose steps alternate compiled and eager after the warm-up (the module keeps its
compiled code while off), so a busy machine's load drifts hit both alike: the compile row for a shared CPU;
``baseline`` the straightforward formulation: one encode per cutout, text re-encoded each step, fp32
throughout. ``--precision bf16|fp16`` applies to ``clipsteer`` and ``compiled``.

    python benchmarks/speed.py --cases vqgan sd --impls interleaved --sizes 128   # the compile row

``precision``: fp32, bf16 and what ``--precision auto`` chooses on this device (printed with the reason; fp16 on
a GPU without bf16), each a full set-up (models in that precision) in one process, their steps taken in turn
round after round so a busy machine's load hits all alike; each row has its ``speedup_vs_fp32``, and the
``auto`` row is the row of the precision auto chose. Cases ``vqgan``, ``sd`` (guided, full VAE) and ``noise``
(the noise backend, one render step, on the same SD architecture).

    python benchmarks/speed.py --cases vqgan --impls precision --sizes 128 --json precision.json

Cases:
- ``clip-loss``: one CLIPLoss forward+backward on one image, ViT-B/32, 32 cutouts, Af Pe Ji Er.
- ``vqgan``: one VQGAN+CLIP iteration, taming f16-16384 + ViT-B/32, 32 cutouts, Adam.
- ``sd``: one CLIP-guided and one plain Stable Diffusion step (SD 1.5 UNet/VAE, ViT-B/32
  guide, 4 cutouts), with the full VAE or the tiny autoencoder decoding the guidance image.
- ``noise`` (impl ``precision`` only): one noise-backend iteration (SD 1.5 architecture, one DDIM render step,
  ViT-B/32 guide, 4 cutouts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# run as ``python benchmarks/speed.py``: its folder is first on sys.path, so its sibling common.py imports
from common import (CACHE, TINY, clip_folder, environment, peak_memory_mb, run_isolated, summary, taming_config,
                    tests_module, time_calls)

PROMPT = "a lighthouse at dusk, oil painting"
AUGS = ["affine", "perspective", "jitter", "erasing"]


def _compile(args, encoder, generator=None) -> list:
    """``--compile`` as a run applies it: the CLIP image tower and the backend's decoder (impls ``compiled``
    and ``interleaved``, whose first step is compiled); returns the modules."""
    from guidance.runtime import set_compiled

    modules = [encoder.image_tower] + (list(generator.compile_targets()) if generator is not None else [])
    set_compiled(modules, args.impl in ("compiled", "interleaved"))
    return modules


def _alternate(modules):
    """The step callback of ``interleaved``: step k runs compiled when k is even, eager when odd."""
    from guidance.runtime import set_compiled

    return lambda info: set_compiled(modules, (info.step + 1) % 2 == 0)


def _interleaved_times(stamps: list[float], skip: int) -> dict:
    """Eager and compiled step times of an ``interleaved`` run (stamps at each step's end; step 0 and the
    next *skip* steps are warm-up), with their ratio."""
    import statistics

    eager = [stamps[j] - stamps[j - 1] for j in range(1 + skip, len(stamps)) if j % 2]
    compiled = [stamps[j] - stamps[j - 1] for j in range(1 + skip, len(stamps)) if not j % 2]
    return {"eager": summary(eager), "compiled": summary(compiled),
            "compile_speedup": statistics.median(eager) / statistics.median(compiled)}


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
    if args.impl != "baseline":
        _compile(args, encoder)
        loss_fn = CLIPLoss(encoder, PROMPT, cutouts=Cutouts(args.cutn, augmentations=AUGS))

        def step():
            loss_fn(image, generator=gen).total.backward()
    else:
        def step():
            _baseline_clip_loss(encoder, image, PROMPT, args.cutn, gen).backward()
    times = time_calls(step, warmup=args.warmup, repeats=args.repeats, device=device)
    return {"case": "clip-loss", "impl": args.impl, "size": args.size, "cutn": args.cutn, **summary(times)}


# -- vqgan -----------------------------------------------------------------------------
def _step_times(stamps: list[float], skip: int) -> list[float]:
    """Per-step seconds from callback time stamps, dropping the first *skip* (warm-up) steps."""
    return [b - a for a, b in zip(stamps, stamps[1:])][skip:]


def _vqgan_parts(args, device):
    from generators.vqgan.taming import TamingConfig, build_first_stage
    from guidance import load_encoder

    torch.manual_seed(0)
    with torch.device(device):     # random weights made where they run (fast on a GPU)
        model = build_first_stage(TamingConfig.from_dict(taming_config(), source="taming imagenet f16 16384"))
    encoder = load_encoder(str(clip_folder("ViT-B/32", CACHE / "clip-vit-b-32")), device=device,
                           precision=args.precision)
    return model, encoder


def _baseline_vqgan(model, encoder, args, device) -> list[float]:
    """VQGAN+CLIP as the classic notebook loop writes it, per cutout, fp32."""
    from generators.vqgan.backend import clamp_with_grad, straight_through_quantize

    model = model.to(device)
    codebook = model.codebook.detach()
    f = model.downsample
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(codebook.shape[0], (args.size // f * args.size // f,), generator=gen)
    z = codebook[idx.to(device)].view(1, args.size // f, args.size // f, -1).permute(0, 3, 1, 2).clone()
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)

    def step():
        opt.zero_grad()
        image = clamp_with_grad(model.decode(straight_through_quantize(z, codebook)).add(1).div(2))
        _baseline_clip_loss(encoder, image, PROMPT, args.cutn, gen).backward()
        opt.step()
    return time_calls(step, warmup=args.warmup, repeats=args.repeats, device=device)


def case_vqgan(args, device) -> dict:
    from generators.vqgan.backend import VQGANGenerator, VQGANSettings
    from guidance import CLIPLoss, Cutouts

    model, encoder = _vqgan_parts(args, device)
    if args.impl == "baseline":
        times = _baseline_vqgan(model, encoder, args, device)
    else:
        interleaved = args.impl == "interleaved"
        steps = 1 + args.warmup + (2 * args.repeats if interleaved else args.repeats)
        settings = VQGANSettings(width=args.size, height=args.size, iterations=steps, learning_rate=0.1,
                                 optimizer="Adam")
        gen = VQGANGenerator(settings, device=device, precision=args.precision, model=model)
        alternate = _alternate(_compile(args, encoder, gen)) if interleaved else None
        loss_fn = CLIPLoss(encoder, PROMPT, cutouts=Cutouts(args.cutn, augmentations=AUGS))
        stamps: list[float] = []

        def callback(info):
            from common import sync
            sync(device)
            stamps.append(time.perf_counter())
            if alternate is not None:
                alternate(info)
        gen.generate(loss_fn, seed=0, callback=callback)
        if interleaved:
            both = _interleaved_times(stamps, args.warmup)
            return {"case": "vqgan", "impl": args.impl, "size": args.size, "cutn": args.cutn,
                    **both["compiled"], "eager_median_s": both["eager"]["median_s"], **both}
        times = _step_times(stamps, args.warmup)
    return {"case": "vqgan", "impl": args.impl, "size": args.size, "cutn": args.cutn,
            "vqgan": "taming imagenet f16 16384 (random weights)", "clip": "ViT-B/32 (random weights)",
            **summary(times)}


# -- stable diffusion ------------------------------------------------------------------------
def _sd15_pipeline(dtype, device="cpu"):
    """SD 1.5's UNet and VAE, and the ViT-L/14 text encoder, from their published configs (random weights
    made on *device*)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from toyworld.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, text = _sd15_models()
    tok_dir = write_clip_tokenizer(CACHE / "tokenizer")
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def _sd15_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if TINY:
        parts = tests_module("tiny").tiny_sd_components()
        return parts["unet"], parts["vae"], parts["text_encoder"]

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, projection_dim=768, vocab_size=49408,
                                        max_position_embeddings=77, hidden_act="quick_gelu",
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return unet, vae, text


def _taesd_folder() -> Path:
    from diffusers import AutoencoderTiny

    folder = CACHE / "taesd"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        if TINY:
            tests_module("tiny").tiny_taesd().save_pretrained(folder)
        else:
            AutoencoderTiny().save_pretrained(folder)     # TAESD's published layout, random weights
    return folder


def case_sd(args, device) -> dict:
    from generators.diffusion.sampling import StableDiffusionGenerator
    from guidance import CLIPLoss, Cutouts, load_encoder, resolve_dtype

    dtype = resolve_dtype(args.precision, device)
    pipe = _sd15_pipeline(dtype, device)
    encoder = load_encoder(str(clip_folder("ViT-B/32", CACHE / "clip-vit-b-32")), device=device,
                           precision=args.precision)
    loss_fn = CLIPLoss(encoder, PROMPT, cutouts=Cutouts(args.cutn, augmentations=AUGS))
    interleaved = args.impl == "interleaved"
    steps = 1 + args.warmup + (2 * args.repeats if interleaved else args.repeats)
    results = {}
    variants = {} if interleaved else {"plain": dict(clip_guidance_scale=0.0)}
    if args.impl != "baseline":
        variants["guided"] = dict(clip_guidance_scale=100.0)
        variants["guided_tiny_vae"] = dict(clip_guidance_scale=100.0, tiny_vae=str(_taesd_folder()))
    else:  # the community pipeline's formulation: re-run the UNet with gradients, backprop through it
        variants["guided"] = dict(clip_guidance_scale=100.0, guidance_gradient="full")
    for name, extra in variants.items():
        settings = StableDiffusionGenerator.Settings(
            sd_model="(random SD 1.5 architecture)", width=args.size, height=args.size, steps=steps,
            scheduler="pndm", cfg_scale=7.5, prompt=PROMPT, **extra)
        gen = StableDiffusionGenerator(settings, device=device, precision=args.precision, pipeline=pipe)
        alternate = _alternate(_compile(args, encoder, gen)) if interleaved else None
        stamps: list[float] = []

        def callback(info, stamps=stamps, alternate=alternate):
            from common import sync
            sync(device)
            stamps.append(time.perf_counter())
            if alternate is not None:
                alternate(info)
        gen.generate(loss_fn if extra["clip_guidance_scale"] else None, seed=0, callback=callback)
        if interleaved:
            both = _interleaved_times(stamps, args.warmup)
            results[name] = {**both["compiled"], "eager_median_s": both["eager"]["median_s"], **both}
        else:
            results[name] = summary(_step_times(stamps, args.warmup))
    out = {"case": "sd", "impl": args.impl, "size": args.size, "cutn": args.cutn, "scheduler": "pndm",
           "unet": "SD 1.5 (random weights)", "clip": "ViT-B/32 (random weights)",
           "median_s": results["guided"]["median_s"], "variants": results}
    if interleaved:
        out["compile_speedup"] = results["guided"]["compile_speedup"]
    return out


# -- precision rows -----------------------------------------------------------------------------
def _precisions(device):
    """The precisions to time: fp32, bf16 and auto's choice, each once; and auto's choice."""
    from guidance.runtime import choose_precision

    auto = choose_precision("auto", device)
    names = ["fp32", "bf16"] + ([auto.precision] if auto.precision not in ("fp32", "bf16") else [])
    return names, auto


def _steps_of(generator, objective, steps: int, device) -> Callable[[], list[float]]:
    """A call running *generator* for *steps* steps and returning the times of all steps but the first."""
    def run() -> list[float]:
        from common import sync

        stamps: list[float] = []

        def callback(info):
            sync(device)
            stamps.append(time.perf_counter())
        generator.generate(objective, seed=0, callback=callback)
        return _step_times(stamps, 0)
    return run


def _vqgan_runner(args, device, precision: str, steps: int, model):
    from generators.vqgan.backend import VQGANGenerator, VQGANSettings
    from guidance import CLIPLoss, Cutouts

    encoder = _clip(device, precision)
    settings = VQGANSettings(width=args.size, height=args.size, iterations=steps, learning_rate=0.1, optimizer="Adam")
    gen = VQGANGenerator(settings, device=device, precision=precision, model=model)
    return _steps_of(gen, CLIPLoss(encoder, PROMPT, cutouts=Cutouts(args.cutn, augmentations=AUGS)), steps, device)


def _sd_runner(args, device, precision: str, steps: int, backend: str):
    from generators.diffusion.noise import NoiseGenerator
    from generators.diffusion.sampling import StableDiffusionGenerator
    from guidance import CLIPLoss, Cutouts, resolve_dtype

    pipe = _sd15_pipeline(resolve_dtype(precision, device), device)
    loss_fn = CLIPLoss(_clip(device, precision), PROMPT, cutouts=Cutouts(args.cutn, augmentations=AUGS))
    if backend == "sd":
        settings = StableDiffusionGenerator.Settings(
            sd_model="(random SD 1.5 architecture)", width=args.size, height=args.size, steps=steps,
            scheduler="pndm", cfg_scale=7.5, prompt=PROMPT, clip_guidance_scale=100.0)
        gen = StableDiffusionGenerator(settings, device=device, precision=precision, pipeline=pipe)
    else:
        settings = NoiseGenerator.Settings(sd_model="(random SD 1.5 architecture)", width=args.size,
                                           height=args.size, iterations=steps, render_steps=1, scheduler="ddim",
                                           keep_best=False)
        gen = NoiseGenerator(settings, device=device, precision=precision, pipeline=pipe)
    return _steps_of(gen, loss_fn, steps, device)


def _clip(device, precision: str):
    from guidance import load_encoder

    return load_encoder(str(clip_folder("ViT-B/32", CACHE / "clip-vit-b-32")), device=device, precision=precision)


def case_precision(args, device) -> dict:
    """``--impls precision``: every precision's set-up built once, then ``--repeats`` rounds in which each
    runs 1 + ``--warmup`` steps (the first, which sets up the run, is not timed)."""
    names, auto = _precisions(device)
    print(f"{auto} on {device}", file=sys.stderr)
    steps = 2 + args.warmup
    if args.case == "vqgan":
        from generators.vqgan.taming import TamingConfig, build_first_stage

        torch.manual_seed(0)
        with torch.device(device):
            model = build_first_stage(TamingConfig.from_dict(taming_config(), source="taming imagenet f16 16384"))
        runners = {name: _vqgan_runner(args, device, name, steps, model) for name in names}
    else:
        runners = {name: _sd_runner(args, device, name, steps, args.case) for name in names}
    for run in runners.values():                    # one untimed round: first calls allocate and warm caches
        run()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, run in runners.items():
            times[name] += run()
    rows = {name: summary(t) for name, t in times.items()}
    for row in rows.values():
        row["speedup_vs_fp32"] = rows["fp32"]["median_s"] / row["median_s"]
    rows["auto"] = {**rows[auto.precision], "chose": auto.precision}
    return {"case": args.case, "impl": "precision", "size": args.size, "cutn": args.cutn, "auto": auto.as_dict(),
            "clip": "ViT-B/32 (random weights)", "median_s": rows["auto"]["median_s"],
            "auto_speedup_vs_fp32": rows["auto"]["speedup_vs_fp32"], "rows": rows}


CASES = {"clip-loss": case_clip_loss, "vqgan": case_vqgan, "sd": case_sd, "noise": case_precision}
DEFAULT_CUTN = {"clip-loss": 32, "vqgan": 32, "sd": 4, "noise": 4}
IMPLS = ("clipsteer", "compiled", "interleaved", "baseline", "precision")
PRECISION_CASES = ("vqgan", "sd", "noise")


def run_case(args) -> None:
    from guidance import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.impl == "precision":
        result = case_precision(args, device)
    else:
        result = CASES[args.case](args, device)
        result["precision"] = args.precision or "fp32"
    result.update(peak_memory_mb(device), threads=torch.get_num_threads())
    print(json.dumps(result))


def main(argv=None) -> None:
    from guidance import resolve_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["clip-loss", "vqgan"], help="cases to run (default: %(default)s)")
    parser.add_argument("--impls", nargs="+", default=["clipsteer", "baseline"],
                        help="implementations to compare: clipsteer, compiled (clipsteer with --compile), interleaved "
                             "(compiled and eager steps alternating in one run), baseline, precision (fp32, bf16 "
                             "and auto in turn in one run)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128], help="image sizes (square)")
    parser.add_argument("--cutn", type=int, default=None,
                        help="cutouts per iteration (default: 32 for clip-loss and vqgan, 4 for sd)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is steadier on a "
                                                    "busy machine)")
    parser.add_argument("--precision", default=None, help="fp32 (default), bf16 or fp16 (clipsteer only)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return run_case(args)

    results = []
    for impl in args.impls:
        if impl not in IMPLS:
            parser.error(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    for case in args.cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        for size in args.sizes:
            for impl in args.impls:
                if (impl == "precision" and case not in PRECISION_CASES) or (case == "noise" and impl != "precision"):
                    continue                # clip-loss has no precision rows; the noise case has only those
                cmd = ["--case", case, "--impl", impl, "--size", str(size), "--cutn", str(args.cutn or DEFAULT_CUTN[case]),
                       "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--device", args.device]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                if args.precision and impl not in ("baseline", "precision"):
                    cmd += ["--precision", args.precision]
                res = run_isolated(Path(__file__), cmd)
                print(json.dumps(res), file=sys.stderr)
                results.append(res)
    for case in args.cases:
        for size in args.sizes:
            rows = {r.get("impl"): r for r in results if r.get("case") == case and r.get("size") == size}
            if "clipsteer" in rows and "baseline" in rows and "median_s" in rows["clipsteer"]:
                rows["clipsteer"]["speedup_vs_baseline"] = rows["baseline"]["median_s"] / rows["clipsteer"]["median_s"]
            if "clipsteer" in rows and "median_s" in rows.get("compiled", {}) and "median_s" in rows["clipsteer"]:
                rows["compiled"]["compile_speedup"] = rows["clipsteer"]["median_s"] / rows["compiled"]["median_s"]
    device = resolve_device(args.device)
    report = {"environment": environment(device), "results": results}
    if "precision" in args.impls:
        from guidance.runtime import choose_precision

        report["auto"] = choose_precision("auto", device).as_dict()
        print(f"{choose_precision('auto', device)} on {device}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
