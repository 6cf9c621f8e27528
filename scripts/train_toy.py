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
from toyworld.prompts import CATEGORIES  # noqa: E402

GROUPS = ("clip", "vqgan", "sd", "sd_turbo", "itm", "guided")
# the model folders each group reads from --out (trained earlier in the same run, or already there)
NEEDS = {"sd": ("clip_a",), "sd_turbo": ("sd",), "guided": ("sd", "clip_a", "clip_c", "clip_d")}
GROUP_MODELS = {"clip": CLIPS, "vqgan": ("vqgan",), "sd": ("sd",), "sd_turbo": ("sd_turbo",), "itm": ("itm",),
                "guided": ("sd_guided",)}


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


def measure_guided(out: Path, per_category: int = 8) -> dict:
    """The held-out prompts (``toyworld.evaluation.held_out_prompts``) through clipsteer's SD backend at the
    toy preset, with its CLIP guidance and without (scale 0), one image per prompt with seed = its index;
    judged by the rule per category."""
    from generators.run import generate
    from toyworld.evaluation import held_out_prompts
    from toyworld.rule import category_scores, judge

    prompts = held_out_prompts(per_category)
    clips = [str(out / name) for name in ("clip_a", "clip_c", "clip_d")]
    rows = {}
    for label, extra in (("unguided", {"clip_guidance_scale": 0.0}), ("clip", {})):
        t0 = time.perf_counter()
        images, settings = [], {}
        for seed, prompt in enumerate(prompts):
            run = generate(prompt.text, backend="sd", preset="toy", seed=seed, save=False, progress=False,
                           sd_model=str(out / "sd"), clip=clips, eval_model="none", **extra)
            images.append(run.images)
            settings = run.metadata["backend_settings"]
        scores = category_scores(prompts, judge(torch.cat(images), prompts))
        rows[label] = {"judge_by_category": scores, "seconds": time.perf_counter() - t0,
                       "clip_guidance_scale": settings["clip_guidance_scale"] if label == "clip" else 0.0}
        _log(f"[guided] {label}: {json.dumps(scores)}")
    return {"n_images": len(prompts), "seeds": f"0-{len(prompts) - 1}", "steps": settings["steps"],
            "scheduler": settings["scheduler"], "cfg_scale": settings["cfg_scale"], "clips": ["clip_a", "clip_c", "clip_d"],
            "rows": rows, "train_seconds": 0.0}


def _category_row(label: str, scores: dict, extra: str = "") -> str:
    cells = " | ".join(_pct(scores[c]["accuracy"]) if isinstance(scores.get(c), dict) else _pct(scores[c])
                       for c in CATEGORIES)
    overall = scores.get("overall")
    if overall is None:
        overall = sum(scores[c] for c in CATEGORIES) / len(CATEGORIES)
    return f"| {label} | {cells} | {_pct(overall)} |{extra}"


def _category_header(first: str, extra: str = "") -> list[str]:
    return [f"| {first} | " + " | ".join(CATEGORIES) + f" | overall |{extra}",
            "| --- " * (len(CATEGORIES) + 2) + "|" + (" --- |" if extra else "")]


def write_report(out: Path, metrics: dict) -> str:
    lines = [
        "# Toy-world models: training record",
        "",
        "Written by `scripts/train_toy.py` from its own measurements -- do not edit by hand.",
        "Retrain everything with `nice -n 10 python scripts/train_toy.py` "
        "(or `--only clip|vqgan|sd|sd_turbo|guided`, or one CLIP: `--only clip_c`; `--resume` continues a stopped run).",
        "The world, its five prompt categories and the judging rule are `shared/TOYWORLD.md`'s (toy world v3); "
        "accuracies below are by that rule, per category, overall = the mean of the five.",
        "",
    ]
    sizes = {name: _folder_bytes(out / name) for name in (*CLIPS, "vqgan", "sd", "sd_turbo", "itm") if (out / name).is_dir()}
    lines += ["## Sizes on disk", "", "| model | size |", "| --- | --- |"]
    lines += [f"| `{name}` | {_mb(b)} |" for name, b in sizes.items()]
    lines += [f"| total | {_mb(sum(sizes.values()))} |", ""]

    runs = metrics.get("runs", {})
    lines += ["## Training runs", "", "| group | finished (UTC) | wall time of the group | machine |", "| --- | --- | --- | --- |"]
    for group, r in runs.items():
        lines.append(f"| {group} | {r['finished']} | {r['wall_seconds']:.0f} s | {r['machine']} |")
    total = sum(r["wall_seconds"] for r in runs.values())
    lines.append(f"| sum of the runs above | | {total:.0f} s ({total / 60:.1f} min) | |")
    lines += ["", "Times are wall-clock on a shared CPU machine (other jobs ran alongside, so they vary with load; "
              "the load average at start and end of each group is in `training_metrics.json`).", ""]

    roles = {"clip_a": "guides, with C and D; its text tower conditions the toy SD", "clip_b": "judges; never guides",
             "clip_c": "guides, with A and D", "clip_d": "guides, with A and C"}
    clip_rows = [name for name in CLIPS if metrics.get(name, {}).get("hard_negatives")]
    if clip_rows:
        lines += ["## Toy CLIPs", ""]
        for name in clip_rows:
            m, r = metrics[name], metrics[name]["recipe"]
            lines.append(
                f"- `{name}` ({roles[name]}): transformers `CLIPModel`, vision ViT {r['image_size']}px / patch {r['patch_size']}, "
                f"hidden {r['vision_hidden']}, {r['vision_layers']} layers; text hidden {r['text_hidden']}, {r['text_layers']} layers; "
                f"{m['params'] / 1e6:.2f} M parameters (stored fp16); seed {m['seed']}, {m['steps']} steps x batch {m['batch_size']}, "
                f"{r['negatives']} hard negatives per image; {m['train_seconds']:.0f} s.")
        lines += ["", "Zero-shot accuracy among hard negatives: for 64 held-out scenes of each category, the share where the "
                  "CLIP ranks the true prompt above every hard negative of it (`toyworld.negatives`: swapped colours, "
                  "opposite or reversed relation, another count, one shape/colour/background changed, an object fewer "
                  "or more) -- clean images, and with gaussian noise sigma 0.1:", ""]
        lines += _category_header("CLIP (images)")
        for name in clip_rows:
            for split, acc in metrics[name]["hard_negatives"].items():
                lines.append(_category_row(f"`{name}`{' (judge)' if name == 'clip_b' else ''} ({split})", acc))
        lines += ["", "Single objects as in v2 (argmax over all 224 captions \"a {colour} {shape} on a {background} "
                  "background\", 512 held-out v2 images), all three attributes right:", "",
                  "| CLIP | clean | noisy | augmented |", "| --- | --- | --- | --- |"]
        for name in clip_rows:
            zs = metrics[name]["zero_shot"]
            lines.append(f"| `{name}` | {_pct(zs['clean']['all'])} | {_pct(zs['noisy']['all'])} | {_pct(zs['augmented']['all'])} |")
        lines.append("")

    m = metrics.get("itm")
    if m:
        r = m["recipe"]
        lines += ["## Toy image-text matching model (`itm`, the compositional reward; never judges the benchmark)", "",
                  f"- transformers `BlipForImageTextRetrieval`: ViT {r['image_size']}px / patch {r['patch_size']}, hidden "
                  f"{r['hidden']}, {r['layers']} layers; text encoder {r['text_layers']} layers cross-attending to the "
                  f"patches; {m['params'] / 1e6:.2f} M parameters (stored fp16); seed {m['seed']}, {m['steps']} steps x "
                  f"batch {m['batch_size']}, {m['negatives']} hard negatives per image; {m['train_seconds']:.0f} s", "",
                  "Ranking accuracy among hard negatives (as for the CLIPs above):", ""]
        lines += _category_header("images")
        lines += [_category_row(split, acc) for split, acc in m["hard_negatives"].items()]
        lines.append("")

    recon = []
    if metrics.get("vqgan", {}).get("judge_by_category"):
        m = metrics["vqgan"]
        lines += ["## Toy VQGAN (`vqgan`)", "",
                  f"- taming `Encoder`/`Decoder` + `VectorQuantizer2` (VQModel layout), {m['params'] / 1e6:.2f} M parameters, "
                  f"{m['n_embed']} codes; seed {m['seed']}, {m['steps']} steps x batch {m['batch_size']}, lr {m['lr']}; "
                  f"{m['train_seconds']:.0f} s; held-out PSNR {m['psnr_db']:.2f} dB; {m['codes_used']}/{m['n_embed']} codes used.", ""]
        recon.append(("VQGAN (encode -> quantise -> decode)", m["judge_by_category"]))
    sd = metrics.get("sd", {})
    if sd.get("vae", {}).get("judge_by_category"):
        v, u = sd["vae"], sd["unet"]
        lines += ["## Toy Stable Diffusion (`sd`)", "",
                  f"- vae: `AutoencoderKL` 64x64x3 -> {'x'.join(str(d) for d in v['latent_shape'][::-1])} latents, "
                  f"{v['params'] / 1e6:.2f} M parameters, seed {v['seed']}, {v['steps']} steps, {v['train_seconds']:.0f} s; "
                  f"scaling_factor {v['scaling_factor']:.4f}; held-out PSNR {v['psnr_db']:.2f} dB",
                  f"- unet: `UNet2DConditionModel`, {u['params'] / 1e6:.2f} M parameters, seed {u['seed']}, {u['steps']} steps "
                  f"x batch {u['batch_size']}, lr {u['lr']}, {u['train_seconds']:.0f} s (frozen CLIP A text tower, 10% caption "
                  f"dropout, epsilon prediction, scaled_linear betas, offset noise {u['offset_noise']:g}); data: v3 scenes "
                  "of every category, half of the single-object ones captioned with a v2 template", ""]
        recon.append(("SD VAE (encode -> mode -> decode)", v["judge_by_category"]))
    if recon:
        lines += ["### Reconstructions judged by the rule (64 held-out scenes per category)", ""]
        lines += _category_header("autoencoder")
        lines += [_category_row(label, scores) for label, scores in recon]
        lines.append("")
    if sd.get("samples", {}).get("judge_by_category"):
        s0 = sd["samples"]
        lines += [f"### Unguided samples (`StableDiffusionPipeline`, {s0['scheduler']}, seed {s0['seed']}; "
                  f"{s0['n_images'] // len(CATEGORIES)} held-out prompts per category, one image each)", ""]
        lines += _category_header("sampler")
        for r in [s0, *sd.get("more_samples", [])]:
            lines.append(_category_row(f"{r['steps']} steps, CFG {r['guidance_scale']:g}" + (" (default)" if r is s0 else ""),
                                       r["judge_by_category"]))
        lines.append("")
    g = metrics.get("sd_guided")
    if g and "judge_by_category" in next(iter(g["rows"].values())):
        lines += ["## Toy SD with and without CLIP guidance (clipsteer's SD backend)", "",
                  f"{g['n_images']} held-out prompts, one image each (seeds {g['seeds']}), through "
                  f"`generate(prompt, backend=\"sd\", preset=\"toy\")`: {g['scheduler']} {g['steps']} steps, CFG "
                  f"{g['cfg_scale']:g}; guided by {', '.join(g['clips'])} together.", ""]
        lines += _category_header("sampling", " seconds (all images) |")
        for label, r in g["rows"].items():
            name = "no CLIP guidance" if label == "unguided" else f"CLIP guidance, scale {r['clip_guidance_scale']:g}"
            lines.append(_category_row(name, r["judge_by_category"], f" {r['seconds']:.0f} |"))
        lines.append("")
    m = metrics.get("sd_turbo")
    if m and "judge_by_category" in next(iter(m["samples"].values())):
        t, st = m["teacher"], m["student"]
        lines += ["## Toy SD-Turbo (`sd_turbo`, few-step student of `sd`)", "",
                  f"- teacher: `{t['folder']}`, {t['scheduler']} {t['steps']} steps, CFG {t['guidance_scale']:g}, "
                  f"{t['n_pairs']} fixed-seed noises, {t['seconds']:.0f} s; student: {st['steps']} steps x batch {st['batch_size']}, "
                  f"regression of its implied clean latent onto the teacher's at trailing timesteps {tuple(st['timesteps'])}, "
                  f"{st['seconds']:.0f} s; sample with `num_inference_steps` 1-4 and `guidance_scale=0`", ""]
        lines += _category_header("steps")
        lines += [_category_row(k, r["judge_by_category"]) for k, r in m["samples"].items()]
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
    ap.add_argument("--sd-unet-steps", type=int, default=5000, metavar="N",
                    help="training steps of the toy SD's UNet (default 5000, the committed weights)")
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
        ap.error(f"--sd-unet-steps is {args.sd_unet_steps}; give at least 1 (the committed weights use 5000)")
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
                     f"hard negatives {json.dumps(m['hard_negatives'])}")
        elif group == "vqgan":
            from toyworld.train_vqgan import train_vqgan

            m = train_vqgan(out / "vqgan", steps=steps(2500), log=_log, resume=args.resume)
            metrics["vqgan"] = m
            _log(f"== vqgan: {m['train_seconds']:.0f} s; PSNR {m['psnr_db']:.2f} dB (MSE {m['mse']:.5f}); "
                 f"{m['codes_used']}/{m['n_embed']} codes used, perplexity {m['perplexity']:.1f}; "
                 f"judged by category {json.dumps(m['judge_by_category'])}")
        elif group == "sd":
            from toyworld.train_sd import train_sd

            m = train_sd(out / "sd", clip_folder=out / "clip_a", vae_steps=steps(3000), unet_steps=steps(args.sd_unet_steps), log=_log,
                         resume=args.resume)
            metrics["sd"] = m
            _log(f"== sd: {m['train_seconds']:.0f} s (vae {m['vae']['train_seconds']:.0f} s, unet {m['unet']['train_seconds']:.0f} s); "
                 f"vae PSNR {m['vae']['psnr_db']:.2f} dB, judge on reconstructions {json.dumps(m['vae']['judge_by_category'])}; "
                 f"samples judged {json.dumps(m['samples']['judge_by_category'])}")
        elif group == "itm":
            from toyworld.train_itm import train_itm

            m = train_itm(out / "itm", steps=steps(3000), log=_log, resume=args.resume)
            metrics["itm"] = m
            _log(f"== itm: {m['train_seconds']:.0f} s; hard negatives {json.dumps(m['hard_negatives'])}")
        elif group == "guided":
            m = measure_guided(out)
            metrics["sd_guided"] = m
            _log(f"== guided: {json.dumps({k: r['judge_by_category'] for k, r in m['rows'].items()})}")
        elif group == "sd_turbo":
            from toyworld.train_fewstep import train_fewstep

            m = train_fewstep(out / "sd_turbo", teacher_folder=out / "sd", n_pairs=steps(2048), steps=steps(2400), log=_log,
                              resume=args.resume)
            metrics["sd_turbo"] = m
            _log(f"== sd_turbo: {m['train_seconds']:.0f} s (teacher samples {m['teacher']['seconds']:.0f} s, "
                 f"student {m['student']['seconds']:.0f} s); judged at 1/2/4 steps: "
                 + "; ".join(f"{k}: {json.dumps(r['judge_by_category'])}" for k, r in m["samples"].items()))
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
