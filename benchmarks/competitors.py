"""clipsteer next to the tools it competes with, run as black boxes, timed the same way in one run.

The competitors are run from their own source, which this script never ships or copies: point it at
a checkout. Both sides use random weights in the same full-size architectures (speed does not
depend on weight values), the same settings, and the same timing method: the wall time of a run
with ``B`` steps minus the wall time of a run with ``A`` steps, over ``B - A``, which removes
model loading and every other per-run cost. Peak RSS is that of the ``B`` run's process.

    # nerdyrodent/VQGAN-CLIP generate.py vs scripts/generate.py (f16-16384 VQGAN, ViT-B/32, 32 cuts)
    python benchmarks/competitors.py vqgan --nerdyrodent ~/src/VQGAN-CLIP --pythonpath ~/nr-deps
    # diffusers' community clip_guided_stable_diffusion.py vs the sd backend (SD 1.5 configs, 4 cuts)
    python benchmarks/competitors.py sd --community ~/src/diffusers/examples/community/clip_guided_stable_diffusion.py
    # on a GPU, as benchmarks/gpu_check.sh runs them: fp16 at 512², seconds per 50-step image, and clipsteer in bf16
    python benchmarks/competitors.py sd --community ... --device cuda --precision fp16 --size 512 --steps 2 50
    python benchmarks/competitors.py vqgan --nerdyrodent ... --device cuda --precision bf16 --size 512

``--precision`` sets clipsteer's ``--precision`` (sd: the model dtype of both pipelines); ``--compile``
(vqgan) runs clipsteer with ``--compile``. Without ``--community`` the sd case times clipsteer's rows only
(``full``, ``x0``, ``x0`` with the tiny VAE). On CUDA both tools are started through a launcher that
reports the process's peak allocated GPU memory.

``--pythonpath`` is prepended to PYTHONPATH for the competitor only: nerdyrodent's script needs
packages clipsteer does not (``clip-anytorch``, ``pytorch-lightning``, ``torch-optimizer``,
``imageio``; on pytorch-lightning 2, a module ``pytorch_lightning/utilities/distributed.py`` that
re-exports ``rank_zero_only`` from ``pytorch_lightning.utilities.rank_zero``; ``clip-anytorch`` wants
``setuptools<70``). Its ``from CLIP import clip`` is satisfied by a stub package in the cache folder.

On transformers 5 both competitors call ``.norm`` on what ``get_*_features`` return; the community
pipeline is therefore handed :class:`guidance.score.TorchmetricsCLIP` (the pooled tensor, as
transformers 4 returned it). Its code is otherwise run unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# benchmarks/common.py: run as ``python benchmarks/competitors.py``, this file's folder is first on sys.path
from common import CACHE, clip_folder, sync, taming_config

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse at dusk, oil painting"
# Runs a Python script as ``python SCRIPT ARGS`` would, then reports the process's peak allocated CUDA memory on
# stderr: both tools are launched through it on a GPU, so their peaks are measured alike. The script is
# third-party reference code (nerdyrodent's generate.py, diffusers' community pipeline) that imports its own
# sibling modules, so the launcher puts the script's folder first on sys.path as ``python SCRIPT`` does.
CUDA_PEAK = ("import atexit, runpy, sys, torch\n"
             "atexit.register(lambda: print('CUDA_PEAK_MB', torch.cuda.max_memory_allocated() / 2**20, file=sys.stderr))\n"
             "sys.argv = sys.argv[1:]\n"
             "sys.path.insert(0, __import__('os').path.dirname(sys.argv[0]))\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def timed_run(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Wall seconds and peak RSS (MB) of one child process; raises with its last stderr line on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)     # this child's own rusage (peak RSS)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {tail}")
    out = {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}
    peaks = [float(line.split()[1]) for line in stderr.splitlines() if line.startswith("CUDA_PEAK_MB ")]
    if peaks:
        out["cuda_peak_mb"] = peaks[-1]
    return out


def python_cmd(device: str) -> list[str]:
    """How a tool's script is started: plain ``python``, or on CUDA through the peak-memory launcher."""
    return [sys.executable] + (["-c", CUDA_PEAK] if device.startswith("cuda") else [])


def per_step(small: dict, large: dict, a: int, b: int) -> dict:
    out = {"s_per_step": (large["wall_s"] - small["wall_s"]) / (b - a), "wall_s": [small["wall_s"], large["wall_s"]],
           "peak_rss_mb": large["peak_rss_mb"]}
    if "cuda_peak_mb" in large:
        out["cuda_peak_mb"] = large["cuda_peak_mb"]
    return out


# -- VQGAN+CLIP: nerdyrodent's generate.py ----------------------------------------------------
def nerdyrodent_files(pythonpath: str | None) -> Path:
    """Random-weight checkpoints in the formats nerdyrodent's loaders read, and the ``CLIP`` stub."""
    folder = CACHE / "nerdyrodent"
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "CLIP"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text("import clip  # noqa: F401  (the clip-anytorch package)\n")
    if not (folder / "vit-b-32.pt").exists() or not (folder / "f16_16384.ckpt").exists():
        code = textwrap.dedent(f"""
            import json, torch, yaml
            from clip.model import CLIP
            from taming.models.vqgan import VQModel
            torch.manual_seed(0)
            clip = CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                        vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
                        transformer_heads=8, transformer_layers=12)
            torch.save(clip.state_dict(), {str(folder / 'vit-b-32.pt')!r})
            params = dict(json.loads({json.dumps(json.dumps(taming_config()))}), lossconfig={{"target": "torch.nn.Identity"}})
            cfg = {{"model": {{"target": "taming.models.vqgan.VQModel", "params": params}}}}
            with open({str(folder / 'f16_16384.yaml')!r}, "w") as fh:
                yaml.safe_dump(cfg, fh)
            torch.save({{"state_dict": VQModel(**params).state_dict()}}, {str(folder / 'f16_16384.ckpt')!r})
        """)
        made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, **_pythonpath_env(pythonpath, folder)})
        if made.returncode != 0:
            last = (made.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"error: could not build nerdyrodent's checkpoints ({last}); pass --pythonpath with "
                             "clip-anytorch and taming-transformers installed (see this script's --help)")
    return folder


def _pythonpath_env(pythonpath: str | None, *extra: Path) -> dict:
    parts = [str(p) for p in extra] + ([pythonpath] if pythonpath else []) + [os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in parts if p)}


def compare_vqgan(args) -> dict:
    script = Path(args.nerdyrodent).expanduser() / "generate.py"
    if not script.is_file():
        raise SystemExit(f"error: no generate.py in {script.parent}; pass --nerdyrodent PATH/TO/VQGAN-CLIP checkout")
    files = nerdyrodent_files(args.pythonpath)
    clip = clip_folder("ViT-B/32", CACHE / "clip-vit-b-32")
    size = [str(args.size), str(args.size)]
    out = Path(tempfile.mkdtemp(prefix="clipsteer-competitors-"))
    common = dict(prompt=PROMPT, cutn=args.cutn, lr=0.1)

    def theirs(n: int) -> list[str]:
        return [*python_cmd(args.device), str(script), "-p", PROMPT, "-cd", args.device if args.device != "cuda" else "cuda:0",
                "-s", *size, "-cuts", str(args.cutn), "-lr", "0.1", "-opt", "Adam", "-sd", "0", "-i", str(n),
                "-se", "100000", "-m", str(files / "vit-b-32.pt"), "-conf", str(files / "f16_16384.yaml"),
                "-ckpt", str(files / "f16_16384.ckpt"), "-o", str(out / f"nerdyrodent-{n}.png")]

    speed = (["--precision", args.precision] if args.precision else []) + (["--compile"] if args.compile else [])

    def ours(n: int) -> list[str]:
        return [*python_cmd(args.device), str(ROOT / "scripts" / "generate.py"), PROMPT, "--backend", "vqgan",
                "--vqgan", str(files / "f16_16384.ckpt"), "--vqgan-config", str(files / "f16_16384.yaml"),
                "--clip", str(clip), "--size", *size, "--cutouts", str(args.cutn), "--augment", "Af", "Pe", "Ji", "Er",
                "--lr", "0.1", "--optimizer", "Adam", "--seed", "0", "--iterations", str(n), "--eval-model", "none",
                "--no-progress", "--device", args.device, "--out", str(out / "clipsteer"), *speed]

    a, b = args.steps
    result = {"case": "vqgan", "size": args.size, "settings": common, "steps": [a, b], "repeats": args.repeats,
              "clipsteer_options": speed}
    impls = (("nerdyrodent", theirs, _pythonpath_env(args.pythonpath, files), script.parent),
             ("clipsteer", ours, {}, ROOT))
    estimates: dict[str, list[dict]] = {name: [] for name, *_ in impls}
    try:
        for _, cmd, env, cwd in impls:   # untimed: first reads of the checkpoints, compiled caches
            timed_run(cmd(1), env=env, cwd=cwd)
        for _ in range(args.repeats):    # interleaved, so load drifts hit both sides alike
            for name, cmd, env, cwd in impls:
                runs = [timed_run(cmd(n), env=env, cwd=cwd) for n in (a, b)]
                estimates[name].append(per_step(runs[0], runs[1], a, b))
                print(f"{name}: {estimates[name][-1]['s_per_step']:.2f} s/iteration, "
                      f"peak RSS {estimates[name][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(out, ignore_errors=True)   # the images both tools wrote: only timing is kept
    for name, runs in estimates.items():
        result[name] = {"s_per_step": statistics.median(r["s_per_step"] for r in runs),
                        "s_per_step_each": [r["s_per_step"] for r in runs],
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "wall_s_each": [r["wall_s"] for r in runs]}
        if all("cuda_peak_mb" in r for r in runs):
            result[name]["cuda_peak_mb"] = max(r["cuda_peak_mb"] for r in runs)
    result["speedup"] = result["nerdyrodent"]["s_per_step"] / result["clipsteer"]["s_per_step"]
    return result


# -- CLIP-guided SD: the diffusers community pipeline ----------------------------------------------
SD_IMPLS = ("community", "clipsteer-x0", "clipsteer-full", "clipsteer-x0-tiny-vae")


def _sd_worker(args) -> None:
    """One process: build the SD 1.5-architecture pipeline once, time ``steps`` A and B, print JSON."""
    import importlib.util

    import torch

    from speed import _sd15_pipeline, _taesd_folder
    from guidance import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    pipe = _sd15_pipeline(dtype, device).to(device)
    clip_dir = clip_folder("ViT-B/32", CACHE / "clip-vit-b-32")
    a, b = args.steps
    walls = {}
    if args.impl == "community":
        from transformers import CLIPImageProcessor, CLIPModel

        from guidance.score import TorchmetricsCLIP

        spec = importlib.util.spec_from_file_location("community_cgsd", Path(args.community).expanduser())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        clip = TorchmetricsCLIP(CLIPModel.from_pretrained(clip_dir, dtype=dtype)).to(device)
        cpipe = module.CLIPGuidedStableDiffusion(
            vae=pipe.vae, text_encoder=pipe.text_encoder, clip_model=clip, tokenizer=pipe.tokenizer,
            unet=pipe.unet, scheduler=pipe.scheduler, feature_extractor=CLIPImageProcessor.from_pretrained(clip_dir))
        cpipe.set_progress_bar_config(disable=True)
        for n in (a, b):
            start = time.perf_counter()
            cpipe(PROMPT, height=args.size, width=args.size, num_inference_steps=n, guidance_scale=7.5,
                  clip_guidance_scale=args.scale, num_cutouts=args.cutn, use_cutouts=True,
                  generator=torch.Generator(device).manual_seed(0), output_type="pt")
            sync(device)
            walls[n] = time.perf_counter() - start
    else:
        from generators.diffusion.sampling import StableDiffusionGenerator
        from guidance import CLIPLoss, Cutouts, load_encoder

        encoder = load_encoder(str(clip_dir), device=device, precision=args.precision)
        mode = args.impl.split("-")[1]
        tiny_vae = str(_taesd_folder()) if args.impl.endswith("-tiny-vae") else None
        for n in (a, b):
            start = time.perf_counter()
            # Loss built inside the timed region, as the community pipeline encodes its prompt per call.
            loss_fn = CLIPLoss(encoder, PROMPT, cutouts=Cutouts(args.cutn, augmentations=[]))
            settings = StableDiffusionGenerator.Settings(
                sd_model="(random SD 1.5 architecture)", width=args.size, height=args.size, steps=n,
                scheduler="pndm", cfg_scale=7.5, prompt=PROMPT, clip_guidance_scale=args.scale,
                guidance_gradient=mode, tiny_vae=tiny_vae)
            StableDiffusionGenerator(settings, device=device, precision=args.precision,
                                     pipeline=pipe).generate(loss_fn, seed=0)
            sync(device)
            walls[n] = time.perf_counter() - start
    import resource
    out = {"impl": args.impl, "s_per_step": (walls[b] - walls[a]) / (b - a), "s_per_image": walls[b],
           "wall_s": [walls[a], walls[b]], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def compare_sd(args) -> dict:
    impls = [i for i in SD_IMPLS if args.community or i != "community"]
    if args.community and not Path(args.community).expanduser().is_file():
        raise SystemExit(f"error: {args.community} is not a file; pass --community PATH/TO/clip_guided_stable_diffusion.py")
    result = {"case": "sd", "size": args.size, "steps": list(args.steps), "scheduler": "pndm", "cfg_scale": 7.5,
              "clip_guidance_scale": args.scale, "cutn": args.cutn, "augmentations": "none (as the community pipeline)",
              "precision": args.precision or "fp32",
              "s_per_image": f"wall seconds of the {args.steps[1]}-step run, after the {args.steps[0]}-step one"}
    for impl in impls:
        cmd = [sys.executable, __file__, "_sd-worker", "--impl", impl, "--community", args.community or "",
               "--size", str(args.size), "--steps", *map(str, args.steps), "--cutn", str(args.cutn),
               "--scale", str(args.scale), "--device", args.device]
        cmd += ["--precision", args.precision] if args.precision else []
        run = timed_run(cmd, cwd=ROOT)
        result[impl] = json.loads([line for line in run["stdout"].splitlines() if line.startswith("{")][-1])
        print(f"{impl}: {result[impl]['s_per_step']:.2f} s/step, {result[impl]['s_per_image']:.2f} s/image, "
              f"peak RSS {result[impl]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    if "community" in result:
        for impl in impls[1:]:
            result[f"speedup_{impl}"] = result["community"]["s_per_image"] / result[impl]["s_per_image"]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="case", required=True)
    vq = sub.add_parser("vqgan", help="nerdyrodent/VQGAN-CLIP generate.py vs scripts/generate.py")
    vq.add_argument("--nerdyrodent", required=True, help="path to a nerdyrodent/VQGAN-CLIP checkout")
    vq.add_argument("--pythonpath", help="extra PYTHONPATH for the competitor's own dependencies")
    vq.add_argument("--size", type=int, default=128)
    vq.add_argument("--cutn", type=int, default=32)
    vq.add_argument("--steps", type=int, nargs=2, default=[3, 9], metavar=("A", "B"), help="iterations of the two runs")
    vq.add_argument("--repeats", type=int, default=3, help="interleaved (A, B) pairs per tool; the median is reported")
    sd = sub.add_parser("sd", help="diffusers community clip_guided_stable_diffusion.py vs the sd backend")
    sd.add_argument("--community", help="path to clip_guided_stable_diffusion.py (without it: clipsteer's rows only)")
    sd.add_argument("--size", type=int, default=256)
    sd.add_argument("--cutn", type=int, default=4)
    sd.add_argument("--scale", type=float, default=100.0, help="CLIP guidance scale")
    sd.add_argument("--steps", type=int, nargs=2, default=[2, 5], metavar=("A", "B"), help="denoising steps of the two runs")
    worker = sub.add_parser("_sd-worker")
    worker.add_argument("--impl", required=True)
    worker.add_argument("--community", default="")
    worker.add_argument("--size", type=int)
    worker.add_argument("--cutn", type=int)
    worker.add_argument("--scale", type=float)
    worker.add_argument("--steps", type=int, nargs=2)
    vq.add_argument("--compile", action="store_true", help="run clipsteer with --compile")
    for p in (vq, sd, worker):
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--precision", help="clipsteer's --precision (sd: both pipelines' model dtype)")
    for p in (vq, sd):
        p.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.case == "_sd-worker":
        return _sd_worker(args)
    result = compare_vqgan(args) if args.case == "vqgan" else compare_sd(args)
    import torch
    result["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
