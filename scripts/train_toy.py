#!/usr/bin/env python
"""Retrain the toy-world models from their fixed seeds and record how they did.

    nice -n 10 python scripts/train_toy.py                # everything (CLIPs A-D, VQGAN, SD, SD-Turbo)
    nice -n 10 python scripts/train_toy.py --only clip    # or vqgan, sd, sd_turbo (repeatable)
    nice -n 10 python scripts/train_toy.py --only clip_c  # or clip_a, clip_b, clip_d: one CLIP of the group
    nice -n 10 python scripts/train_toy.py --only guided  # re-measure only the CLIP-guided samples of ``sd``

Models are written to ``toyworld/weights/<name>`` (or ``--out``). Every figure printed here is
also written, from these measurements, to ``training_metrics.json`` and ``TRAINING.md`` in the
weights folder; with ``--only`` the figures of the models not retrained are kept from the
previous run. ``sd`` uses CLIP A's text tower, so it reads ``clip_a`` from the output folder;
``sd_turbo`` is distilled from ``sd``, so it reads ``sd`` from the output folder as its teacher.
``guided`` trains nothing: it samples ``sd`` through clipsteer's own SD backend with and without the
toy preset's CLIP guidance (``clip_a`` + ``clip_c`` + ``clip_d``) and judges the images.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from toyworld.paths import CLIPS, WEIGHTS_DIR  # noqa: E402

GROUPS = ("clip", "vqgan", "sd", "sd_turbo", "guided")
# the model folders each group reads from --out (trained earlier in the same run, or already there)
NEEDS = {"sd": ("clip_a",), "sd_turbo": ("sd",), "guided": ("sd", "clip_a", "clip_c", "clip_d")}
GROUP_MODELS = {"clip": CLIPS, "vqgan": ("vqgan",), "sd": ("sd",), "sd_turbo": ("sd_turbo",), "guided": ("sd_guided",)}


def _log(msg: str) -> None:
    print(msg, flush=True)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _train_clip_job(name: str, folder: str, n_steps: int, threads: int, resume: bool) -> dict:
    torch.set_num_threads(threads)
    from toyworld.train_clip import train_clip

    return train_clip(name, folder, log=_log, steps=n_steps, eval_every=500, resume=resume)


def measure_guided(out: Path, n: int = 64) -> dict:
    """The ``sd`` samples of ``train_sd.eval_prompts`` through clipsteer's SD backend at the toy preset,
    with its CLIP guidance and without (scale 0), one image per prompt with seed = its index."""
    from generators.run import generate
    from toyworld.judge import accuracy, judge_batch
    from toyworld.train_sd import eval_prompts

    items = eval_prompts(n)
    clips = [str(out / name) for name in ("clip_a", "clip_c", "clip_d")]
    rows = {}
    for label, extra in (("unguided", {"clip_guidance_scale": 0.0}), ("clip", {})):
        t0 = time.perf_counter()
        images, settings = [], {}
        for seed, (prompt, *_) in enumerate(items):
            run = generate(prompt, backend="sd", preset="toy", seed=seed, save=False, progress=False,
                           sd_model=str(out / "sd"), clip=clips, eval_model="none", **extra)
            images.append(run.images)
            settings = run.metadata["backend_settings"]
        judged = judge_batch(torch.cat(images))
        acc = accuracy(judged, [c for _, c, _, _ in items], [s for _, _, s, _ in items], [b for _, _, _, b in items])
        rows[label] = {"judge_accuracy": acc, "seconds": time.perf_counter() - t0,
                       "clip_guidance_scale": settings["clip_guidance_scale"] if label == "clip" else 0.0}
        _log(f"[guided] {label}: {acc}")
    return {"n_images": n, "seeds": f"0-{n - 1}", "steps": settings["steps"],
            "scheduler": settings["scheduler"], "cfg_scale": settings["cfg_scale"], "clips": ["clip_a", "clip_c", "clip_d"],
            "rows": rows, "train_seconds": 0.0}


def write_report(out: Path, metrics: dict) -> str:
    lines = [
        "# Toy-world models: training record",
        "",
        "Written by `scripts/train_toy.py` from its own measurements -- do not edit by hand.",
        "Retrain everything with `nice -n 10 python scripts/train_toy.py` "
        "(or `--only clip|vqgan|sd|sd_turbo`, or one CLIP: `--only clip_c`).",
        "",
    ]
    sizes = {name: _folder_bytes(out / name) for name in (*CLIPS, "vqgan", "sd", "sd_turbo") if (out / name).is_dir()}
    lines += ["## Sizes on disk", "", "| model | size |", "| --- | --- |"]
    lines += [f"| `{name}` | {_mb(b)} |" for name, b in sizes.items()]
    lines += [f"| total | {_mb(sum(sizes.values()))} |", ""]

    runs = metrics.get("runs", {})
    lines += ["## Training runs", "", "| group | finished (UTC) | wall time of the group | machine |", "| --- | --- | --- | --- |"]
    for group, r in runs.items():
        lines.append(f"| {group} | {r['finished']} | {r['wall_seconds']:.0f} s | {r['machine']} |")
    if runs:
        total = sum(r["wall_seconds"] for r in runs.values())
        lines.append(f"| sum of the runs above | | {total:.0f} s ({total / 60:.1f} min) | |")
    lines += ["", "Times are wall-clock on a shared CPU machine (other jobs ran alongside, so they vary with load; "
              "the load average at start and end of each group is in `training_metrics.json`).", ""]

    roles = {"clip_a": "guides, with C and D", "clip_b": "judges; never guides", "clip_c": "guides, with A and D", "clip_d": "guides, with A and C"}
    for name in CLIPS:
        m = metrics.get(name)
        if not m:
            continue
        r = m["recipe"]
        lines += [
            f"## Toy CLIP {name[-1].upper()} (`{name}`, {roles[name]})",
            "",
            f"- transformers `CLIPModel`: vision ViT {r['image_size']}px / patch {r['patch_size']}, hidden {r['vision_hidden']}, "
            f"{r['vision_layers']} layers; text hidden {r['text_hidden']}, {r['text_layers']} layers; projection {r['projection_dim']}; "
            f"{m['params'] / 1e6:.2f} M parameters (stored fp16).",
            f"- seed {m['seed']}, {m['steps']} steps x batch {m['batch_size']} (fresh world images, captions from all templates, "
            f"guidance-style augmentations, {_pct(r['imperfect_prob'])} deliberately imperfect images).",
            f"- training time: {m['train_seconds']:.0f} s",
            "",
            "Zero-shot accuracy on 512 held-out images (argmax over all 224 captions "
            "\"a {colour} {shape} on a {background} background\"):",
            "",
            "| images | colour | shape | background | all three |",
            "| --- | --- | --- | --- | --- |",
        ]
        for split, acc in m["zero_shot"].items():
            lines.append(f"| {split} | {_pct(acc['colour'])} | {_pct(acc['shape'])} | {_pct(acc['background'])} | {_pct(acc['all'])} |")
        lines += ["", "(noisy: gaussian noise sigma 0.1; augmented: one random guidance-style augmentation per image.)", ""]

    m = metrics.get("vqgan")
    if m:
        j = m["judge_on_reconstructions"]
        lines += [
            "## Toy VQGAN (`vqgan`)",
            "",
            f"- taming `Encoder`/`Decoder` + `VectorQuantizer2` (VQModel layout), {m['params'] / 1e6:.2f} M parameters, "
            f"{m['n_embed']} codes; seed {m['seed']}, {m['steps']} steps x batch {m['batch_size']}, lr {m['lr']}.",
            f"- training time: {m['train_seconds']:.0f} s",
            f"- held-out reconstruction ({m['n_images']} images, [0,1] pixels): MSE {m['mse']:.5f}, PSNR {m['psnr_db']:.2f} dB "
            f"(mean per image {m['psnr_db_mean_per_image']:.2f} dB)",
            f"- codebook: {m['codes_used']}/{m['n_embed']} codes used on the held-out set, perplexity {m['perplexity']:.1f}; "
            f"{m['code_restarts']} dead-code re-seeds during training",
            f"- judge on reconstructions: colour {_pct(j['colour'])}, shape {_pct(j['shape'])}, background {_pct(j['background'])}",
            "",
        ]

    m = metrics.get("sd")
    if m:
        v, u, s = m["vae"], m["unet"], m["samples"]
        jv = v["judge_on_reconstructions"]
        recipe = v.get("recipe", {})
        lines += [
            "## Toy Stable Diffusion (`sd`)",
            "",
            f"- vae: `AutoencoderKL` 64x64x3 -> {'x'.join(str(d) for d in v['latent_shape'][::-1])} latents, {v['params'] / 1e6:.2f} M parameters, seed {v['seed']}, {v['steps']} steps"
            + (f" x batch {recipe['batch_size']}, lr {recipe['lr']}, KL weight {recipe['kl_weight']:g}, "
               f"block channels {tuple(recipe['block_out_channels'])}, {recipe['norm_num_groups']} GroupNorm group(s)" if recipe else "")
            + f", {v['train_seconds']:.0f} s; scaling_factor {v['scaling_factor']:.4f}; held-out PSNR {v['psnr_db']:.2f} dB "
            f"(MSE {v['mse']:.5f})",
            f"- unet: `UNet2DConditionModel`, {u['params'] / 1e6:.2f} M parameters, seed {u['seed']}, {u['steps']} steps"
            + (f" x batch {u['batch_size']}" if "batch_size" in u else "")
            + (f", lr {u['lr']}" if "lr" in u else "")
            + f", {u['train_seconds']:.0f} s (frozen CLIP A text tower, 10% caption dropout, epsilon prediction, scaled_linear betas"
            + (f", offset noise {u['offset_noise']:g}" if u.get("offset_noise") else "") + ")",
            "",
            f"Judge on VAE reconstructions of {v['n_images']} held-out world images (encode -> mode -> decode):",
            "",
            "| colour | shape | background | all three |",
            "| --- | --- | --- | --- |",
            f"| {_pct(jv['colour'])} | {_pct(jv['shape'])} | {_pct(jv['background'])} | {_pct(jv.get('all', float('nan')))} |",
            "",
            f"Samples: {s['n_images']} images through `StableDiffusionPipeline` ({s['scheduler']}, seed {s['seed']}) for the "
            "prompts \"a {colour} {shape} on a {background} background\" of `train_sd.eval_prompts`; judge accuracy:",
            "",
            "| sampler | colour | shape | background | all three |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in [s, *m.get("more_samples", [])]:
            j = r["judge_accuracy"]
            lines.append(f"| {r['steps']} steps, CFG {r['guidance_scale']:g}{' (recorded default)' if r is s else ''} | "
                         f"{_pct(j['colour'])} | {_pct(j['shape'])} | {_pct(j['background'])} | {_pct(j['all'])} |")
        lines.append("")

    g = metrics.get("sd_guided")
    if g:
        lines += [
            "## Toy SD with and without CLIP guidance (clipsteer's SD backend)",
            "",
            f"The same {g['n_images']} prompts as above, one image each (seeds {g['seeds']}, one per prompt), through "
            f"`generate(prompt, backend=\"sd\", preset=\"toy\")`: {g['scheduler']} {g['steps']} steps, CFG "
            f"{g['cfg_scale']:g}; guided by the toy CLIPs {', '.join(g['clips'])} together. Judge accuracy:",
            "",
            "| sampling | colour | shape | background | all three | seconds (all images) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, r in g["rows"].items():
            j = r["judge_accuracy"]
            name = "no CLIP guidance" if label == "unguided" else f"CLIP guidance, scale {r['clip_guidance_scale']:g}"
            lines.append(f"| {name} | {_pct(j['colour'])} | {_pct(j['shape'])} | {_pct(j['background'])} | "
                         f"{_pct(j['all'])} | {r['seconds']:.0f} |")
        lines.append("")

    m = metrics.get("sd_turbo")
    if m:
        t, st = m["teacher"], m["student"]
        lines += [
            "## Toy SD-Turbo (`sd_turbo`, few-step student of `sd`)",
            "",
            f"- teacher: the `{t['folder']}` pipeline, {t['scheduler']} {t['steps']} steps with CFG {t['guidance_scale']:g}, "
            f"sampled from {t['n_pairs']} fixed-seed noises (prompts from every caption template), {t['seconds']:.0f} s",
            f"- student: the teacher's UNet config, initialised from its weights ({st['params'] / 1e6:.2f} M parameters), seed {m['seed']}, "
            f"{st['steps']} steps x batch {st['batch_size']}" + (f", lr {st['lr']:g}" if "lr" in st else "") + f", {st['seconds']:.0f} s: direct regression of its implied clean latent onto "
            f"the teacher's output from the same noise, at the trailing timesteps {tuple(st['timesteps'])} "
            f"(each point on the DDIM path through the pair; drawn with weights {tuple(st['timestep_weights'])})",
            "- folder: the teacher's VAE, text encoder and tokenizer; `DDIMScheduler` with `timestep_spacing=\"trailing\"`; "
            "sample with `num_inference_steps` 1-4 and `guidance_scale=0`",
            "",
            "Samples: the same 64 prompts and seed as `sd` above, no classifier-free guidance; judge accuracy:",
            "",
            "| steps | colour | shape | background | all three |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k, r in m["samples"].items():
            j = r["judge_accuracy"]
            lines.append(f"| {k} | {_pct(j['colour'])} | {_pct(j['shape'])} | {_pct(j['background'])} | {_pct(j['all'])} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "TRAINING.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=GROUPS + CLIPS,
                    help="retrain only this group, or only this CLIP of the clip group (repeatable)")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights folder (default: toyworld/weights)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every step count (for quick experiments only; the committed weights use 1.0)")
    ap.add_argument("--sd-unet-steps", type=int, default=2000, metavar="N",
                    help="training steps of the toy SD's UNet (default 2000, the committed weights; 4000 gives a "
                         "much stronger prior that leaves guidance little headroom: see the README's toy world)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared, busy machine one thread is several times "
                         "faster than oversubscribed cores; the thread count is recorded)")
    ap.add_argument("--resume", action="store_true",
                    help="continue each group from its last checkpoint in --out (written every few hundred steps); "
                         "a resumed run ends with the same weights as an uninterrupted one")
    ap.add_argument("--report-only", action="store_true",
                    help="retrain nothing; rewrite TRAINING.md from the recorded training_metrics.json")
    args = ap.parse_args(argv)
    if args.sd_unet_steps < 1:
        ap.error(f"--sd-unet-steps is {args.sd_unet_steps}; give at least 1 (the committed weights use 2000)")
    torch.set_num_threads(args.threads)
    only = args.only or list(GROUPS)
    clips = [c for c in CLIPS if "clip" in only or c in only]
    groups = [g for g in GROUPS if g in only or (g == "clip" and clips)]
    out: Path = args.out
    made = set(clips) | set(groups)
    for group in groups:
        missing = [name for name in NEEDS.get(group, ()) if name not in made and not (out / name).is_dir()]
        if missing:
            ap.error(f"--only {group} reads {', '.join(missing)} from {out}, which has none; copy the weights there "
                     f"first (cp -r toyworld/weights/. {out}) or train {', '.join(missing)} in the same run")
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "training_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if args.report_only:
        _log(write_report(out, metrics))
        return 0
    metrics.setdefault("runs", {})
    machine = f"{_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} (threads={torch.get_num_threads()})"
    scale = args.steps_scale

    def steps(n: int) -> int:
        return max(1, round(n * scale))

    for group in groups:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        if group == "clip":
            from toyworld.train_clip import RECIPES

            # the CLIPs are independent: train them side by side, one process (and thread) each
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(2, len(clips))) as pool:
                jobs = {name: pool.apply_async(_train_clip_job, (name, str(out / name), steps(RECIPES[name].steps), args.threads, args.resume))
                        for name in clips}
                results = {name: job.get() for name, job in jobs.items()}
            for name in clips:
                m = results[name]
                metrics[name] = m
                zs = m["zero_shot"]["clean"]
                _log(f"== {name}: {m['train_seconds']:.0f} s; zero-shot clean colour {_pct(zs['colour'])} "
                     f"shape {_pct(zs['shape'])} background {_pct(zs['background'])}; "
                     f"noisy {json.dumps(m['zero_shot']['noisy'])}; augmented {json.dumps(m['zero_shot']['augmented'])}")
        elif group == "vqgan":
            from toyworld.train_vqgan import train_vqgan

            m = train_vqgan(out / "vqgan", steps=steps(1000), log=_log)
            metrics["vqgan"] = m
            _log(f"== vqgan: {m['train_seconds']:.0f} s; PSNR {m['psnr_db']:.2f} dB (MSE {m['mse']:.5f}); "
                 f"{m['codes_used']}/{m['n_embed']} codes used, perplexity {m['perplexity']:.1f}; "
                 f"judge on reconstructions {json.dumps(m['judge_on_reconstructions'])}")
        elif group == "sd":
            from toyworld.train_sd import train_sd

            m = train_sd(out / "sd", clip_folder=out / "clip_a", vae_steps=steps(1800), unet_steps=steps(args.sd_unet_steps), log=_log)
            metrics["sd"] = m
            _log(f"== sd: {m['train_seconds']:.0f} s (vae {m['vae']['train_seconds']:.0f} s, unet {m['unet']['train_seconds']:.0f} s); "
                 f"vae PSNR {m['vae']['psnr_db']:.2f} dB, judge on reconstructions {json.dumps(m['vae']['judge_on_reconstructions'])}; "
                 f"samples judged {json.dumps(m['samples']['judge_accuracy'])}")
        elif group == "guided":
            m = measure_guided(out)
            metrics["sd_guided"] = m
            _log(f"== guided: {json.dumps({k: r['judge_accuracy'] for k, r in m['rows'].items()})}")
        elif group == "sd_turbo":
            from toyworld.train_fewstep import train_fewstep

            m = train_fewstep(out / "sd_turbo", teacher_folder=out / "sd", n_pairs=steps(2048), steps=steps(2400), log=_log)
            metrics["sd_turbo"] = m
            _log(f"== sd_turbo: {m['train_seconds']:.0f} s (teacher samples {m['teacher']['seconds']:.0f} s, "
                 f"student {m['student']['seconds']:.0f} s); judged at 1/2/4 steps: "
                 + "; ".join(f"{k}: {json.dumps(r['judge_accuracy'])}" for k, r in m["samples"].items()))
        run = {
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "wall_seconds": time.perf_counter() - t0,
            "machine": machine,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "steps_scale": scale,
        }
        # re-read before writing so that concurrent `--only` runs do not drop each other's figures
        latest = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        # a part of the clip group retrained alone is recorded as its own run ("clip_c"), not as the group's
        key = group if group != "clip" or list(clips) == list(CLIPS) else "+".join(clips)
        latest.setdefault("runs", {})[key] = run
        for name in (clips if group == "clip" else GROUP_MODELS[group]):
            latest[name] = metrics[name]
        metrics = latest
        metrics_path.write_text(json.dumps(metrics, indent=1, default=float) + "\n")
        write_report(out, metrics)
    _log("")
    _log(write_report(out, metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
