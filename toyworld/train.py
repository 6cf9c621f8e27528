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
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from toyworld import bars
from toyworld.paths import CLIPS, WEIGHTS_DIR
from toyworld.prompts import CATEGORIES

GROUPS = ("clip", "vqgan", "sd", "sd_turbo", "itm", "guided")
# the model folders each group reads from --out (trained earlier in the same run, or already there)


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


def measure_guided(out: Path, per_category: int = 8) -> dict:
    """The held-out prompts (``toyworld.evaluation.held_out_prompts``) through clipsteer's SD backend at the
    toy preset, with its CLIP guidance and without (scale 0), one image per prompt with seed = its index;
    judged by the rule per category."""
    from generators.runs import generate
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


def run_seconds(group: str, run: dict, metrics: dict) -> float:
    """Seconds a group took: the wall time of its last process or, for a group stopped and resumed
    (``--resume``), the training time its checkpoints kept over every part, whichever is longer."""
    recorded = metrics.get("sd_guided" if group == "guided" else group)
    trained = recorded.get("train_seconds", 0.0) if isinstance(recorded, dict) else 0.0
    return max(run["wall_seconds"], trained or 0.0)


def write_report(out: Path, metrics: dict) -> str:
    lines = [
        "# Toy-world models: training record",
        "",
        "Written by `scripts/train_toy.py` from its own measurements -- do not edit by hand.",
        "Retrain everything with `nice -n 10 python scripts/train_toy.py` "
        "(or `--only clip|vqgan|sd|sd_turbo|itm|guided`, or one CLIP: `--only clip_c`; `--resume` continues a stopped run).",
        "The world, its five prompt categories and the judging rule are `shared/TOYWORLD.md`'s (toy world v3); "
        "accuracies below are by that rule, per category, overall = the mean of the five.",
        "",
    ]
    sizes = {name: _folder_bytes(out / name) for name in (*CLIPS, "vqgan", "sd", "sd_turbo", "itm") if (out / name).is_dir()}
    lines += ["## Sizes on disk", "", "| model | size |", "| --- | --- |"]
    lines += [f"| `{name}` | {_mb(b)} |" for name, b in sizes.items()]
    lines += [f"| total | {_mb(sum(sizes.values()))} |", ""]

    runs = metrics.get("runs", {})
    lines += ["## Training runs", "", "| group | finished (UTC) | wall time of the group (every resumed part) | machine |",
              "| --- | --- | --- | --- |"]
    seconds = {group: run_seconds(group, r, metrics) for group, r in runs.items()}
    for group, r in runs.items():
        lines.append(f"| {group} | {r['finished']} | {seconds[group]:.0f} s | {r['machine']} |")
    total = sum(seconds.values())
    lines.append(f"| sum of the runs above | | {total:.0f} s ({total / 60:.1f} min) | |")
    lines += ["", "Times are wall-clock on a shared CPU machine (other jobs ran alongside, so they vary with load; "
              "the load average at start and end of each group is in `training_metrics.json`). A group that was "
              "stopped and resumed counts the training time its checkpoints kept over every part.", ""]
    lines += bars.report_lines(metrics)

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
                  f"batch {m['batch_size']}, {m['negatives']} hard negatives per image; {m['train_seconds']:.0f} s",
                  *([f"- vision tower started from `{m['vision_init']}`'s; losses: match / no match, the caption ranked "
                     "first among its negatives, and (training only) each patch's colours and shapes"
                     + (", where each patch is, where each shape word's object is, how far each relation word holds; each "
                        "position scene mirrored is a negative of its caption" if "ground_weight" in r else "")]
                    if m.get("vision_init") else []), "",
                  "Ranking accuracy among hard negatives (as for the CLIPs above):", ""]
        lines += _category_header("images")
        lines += [_category_row(split, acc) for split, acc in m["hard_negatives"].items()]
        lines.append("")

    recon = []
    if metrics.get("vqgan", {}).get("judge_by_category"):
        from toyworld.train_vqgan import VQGAN_CONFIG

        m = metrics["vqgan"]
        f = 2 ** (len(VQGAN_CONFIG["model"]["params"]["ddconfig"]["ch_mult"]) - 1)
        lines += ["## Toy VQGAN (`vqgan`)", "",
                  f"- taming `Encoder`/`Decoder` + `VectorQuantizer2` (VQModel layout), {m['params'] / 1e6:.2f} M parameters, "
                  f"downsampling factor {f} (a 64-px image is {64 // f}x{64 // f} codes), "
                  f"{m['n_embed']} codes; seed {m['seed']}, {m['steps']} steps x batch {m['batch_size']}, lr {m['lr']}; "
                  f"{m['train_seconds']:.0f} s; held-out PSNR {m['psnr_db']:.2f} dB; {m['codes_used']}/{m['n_embed']} codes used.", ""]
        recon.append(("VQGAN (encode -> quantise -> decode)", m["judge_by_category"]))
    sd = metrics.get("sd", {})
    if sd.get("vae", {}).get("judge_by_category"):
        v, u = sd["vae"], sd["unet"]
        lines += ["## Toy Stable Diffusion (`sd`)", "",
                  f"- vae: `AutoencoderKL` 64x64x3 -> {'x'.join(str(d) for d in v['latent_shape'][::-1])} latents, "
                  f"{v['params'] / 1e6:.2f} M parameters, seed {v['seed']}, {v['steps']} steps"
                  + (f", then its decoder alone (encoder frozen, so the latents do not change) {d['steps']} steps at lr "
                     f"{d['lr']:g}, seed {d['seed']}" if (d := v.get("decoder_finetune", {})).get("steps") else "")
                  + f", {v['train_seconds']:.0f} s in all; "
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


def report(out: Path, metrics: dict) -> int:
    """Write and print TRAINING.md, then name every bar the recorded models miss (``toyworld.bars``)."""
    _log(write_report(out, metrics))
    for miss in bars.misses(metrics):
        _log(f"below the bar: {miss} (a retrain is a new draw of the recipes; TRAINING.md, section Bars)")
    return 0


# One task per model (the sd group is two: its VAE needs no text encoder, so it trains while CLIP A does).
# Tasks run side by side on --jobs processes (one torch thread each), the first ready task of PRIORITY first:
# the chain clip_a -> sd -> sd_turbo -> guided is the longest, so its links start as soon as they can.
TASK_DEPS = {"clip_a": (), "clip_b": (), "clip_c": (), "clip_d": (), "vqgan": (), "sd_vae": (), "itm": ("clip_a",),
             "sd": ("clip_a", "sd_vae"), "sd_turbo": ("sd",), "guided": ("sd", "clip_a", "clip_c", "clip_d")}
PRIORITY = ("clip_a", "sd_vae", "sd", "sd_turbo", "clip_b", "clip_c", "clip_d", "itm", "vqgan", "guided")
GROUP_TASKS = {"clip": CLIPS, "vqgan": ("vqgan",), "sd": ("sd_vae", "sd"), "sd_turbo": ("sd_turbo",), "itm": ("itm",),
               "guided": ("guided",)}
STEPS = {"vqgan": 3000, "sd_vae": 3000, "sd_vae_decoder": 3000, "itm": 12000, "sd_turbo_pairs": 2048, "sd_turbo": 2400,
         "sd_data": 20000}  # sd_data: scenes encoded once for the UNet's training set


def run_task(name: str, out: str, scale: float, unet_steps: int, threads: int, resume: bool) -> tuple[str, dict, float]:
    """Train one task's model (in a worker process); returns (task, metrics to record, wall seconds)."""
    torch.set_num_threads(threads)
    out = Path(out)
    t0 = time.perf_counter()

    def steps(n: int) -> int:
        return max(1, round(n * scale))

    if name in CLIPS:
        from toyworld.train_clip import RECIPES, train_clip

        m = {name: train_clip(name, out / name, log=_log, steps=steps(RECIPES[name].steps), eval_every=500, resume=resume)}
        _log(f"== {name}: {m[name]['train_seconds']:.0f} s; hard negatives {json.dumps(m[name]['hard_negatives'])}")
    elif name == "vqgan":
        from toyworld.train_vqgan import train_vqgan

        m = {"vqgan": train_vqgan(out / "vqgan", steps=steps(STEPS["vqgan"]), log=_log, resume=resume)}
        _log(f"== vqgan: PSNR {m['vqgan']['psnr_db']:.2f} dB; judged by category {json.dumps(m['vqgan']['judge_by_category'])}")
    elif name == "sd_vae":
        from toyworld.train_sd import vae_stage

        vae_stage(out / "sd", steps(STEPS["sd_vae"]), steps(STEPS["sd_vae_decoder"]), log=_log, resume=resume)
        m = {}
    elif name == "sd":
        from toyworld.train_sd import train_sd

        # the VAE task of this run left the VAE in sd/.training/vae: train_sd picks it up
        m = {"sd": train_sd(out / "sd", clip_folder=out / "clip_a", vae_steps=steps(STEPS["sd_vae"]),
                            decoder_steps=steps(STEPS["sd_vae_decoder"]),
                            unet_steps=steps(unet_steps), log=_log, resume=resume, vae_ready=True,
                            n_data=max(256, steps(STEPS["sd_data"])))}
        _log(f"== sd: samples judged {json.dumps(m['sd']['samples']['judge_by_category'])}")
    elif name == "sd_turbo":
        from toyworld.train_fewstep import train_fewstep

        m = {"sd_turbo": train_fewstep(out / "sd_turbo", teacher_folder=out / "sd", n_pairs=steps(STEPS["sd_turbo_pairs"]),
                                       steps=steps(STEPS["sd_turbo"]), log=_log, resume=resume)}
        _log("== sd_turbo: " + "; ".join(f"{k} steps {json.dumps(r['judge_by_category'])}"
                                         for k, r in m["sd_turbo"]["samples"].items()))
    elif name == "itm":
        from toyworld.train_itm import train_itm

        m = {"itm": train_itm(out / "itm", steps=steps(STEPS["itm"]), log=_log, resume=resume)}
        _log(f"== itm: hard negatives {json.dumps(m['itm']['hard_negatives'])}")
    elif name == "guided":
        m = {"sd_guided": measure_guided(out)}
        _log(f"== guided: {json.dumps({k: r['judge_by_category'] for k, r in m['sd_guided']['rows'].items()})}")
    else:  # pragma: no cover - TASK_DEPS lists every task
        raise KeyError(name)
    return name, m, time.perf_counter() - t0


def finished_tasks(tasks: list[str], out: Path, metrics: dict) -> set[str]:
    """The tasks a ``--resume`` run keeps: their model folder in *out* is complete, no checkpoint of theirs is
    pending and their measurements are recorded (the guided samples and the VAE stage go with the toy SD)."""
    from toyworld.paths import MODELS

    def complete(name: str) -> bool:
        folder = out / name
        return (name in metrics and all((folder / f).is_file() for f in MODELS[name])
                and not any((folder / ".training").glob("*.json")))

    done = {t for t in tasks if t in MODELS and complete(t)}
    if "sd" in done or complete("sd"):
        done |= {"sd_vae"} & set(tasks)
    if "sd_guided" in metrics and "sd" in done:
        done |= {"guided"} & set(tasks)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=GROUPS + CLIPS,
                    help="retrain only this group, or only this CLIP of the clip group (repeatable)")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights folder (default: toyworld/weights)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every step count (for quick experiments only; the committed weights use 1.0)")
    ap.add_argument("--sd-unet-steps", type=int, default=8000, metavar="N",
                    help="training steps of the toy SD's UNet (default 8000, the committed weights)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per training process (default 1: with --jobs processes side by side one "
                         "thread each is fastest; the thread count is recorded)")
    ap.add_argument("--jobs", type=int, default=2, metavar="N",
                    help="models trained side by side, one process each (default 2, one per core of the reference "
                         "machine); the results do not depend on it")
    ap.add_argument("--resume", action="store_true",
                    help="keep the models --out already holds (trained and measured) and continue the others from "
                         "their last checkpoint (written every 200 steps); a resumed run ends with the same weights "
                         "as an uninterrupted one")
    ap.add_argument("--report-only", action="store_true",
                    help="retrain nothing; rewrite TRAINING.md from the recorded training_metrics.json")
    args = ap.parse_args(argv)
    if args.sd_unet_steps < 1:
        ap.error(f"--sd-unet-steps is {args.sd_unet_steps}; give at least 1 (the committed weights use 8000)")
    if args.jobs < 1:
        ap.error(f"--jobs is {args.jobs}; give at least 1")
    torch.set_num_threads(args.threads)
    only = args.only or list(GROUPS)
    tasks = [t for g in GROUPS if g in only for t in GROUP_TASKS[g]]
    tasks += [c for c in CLIPS if c in only and c not in tasks]
    out: Path = args.out
    for task in tasks:
        missing = [d for d in TASK_DEPS[task] if d not in tasks and d != "sd_vae" and not (out / d).is_dir()]
        if missing:
            group = next(g for g, ts in GROUP_TASKS.items() if task in ts)
            ap.error(f"--only {group} reads {', '.join(missing)} from {out}, which has none; copy the weights there "
                     f"first (cp -r toyworld/weights/. {out}) or train {', '.join(missing)} in the same run")
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "training_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if args.report_only:
        return report(out, metrics)
    machine = f"{_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} (threads={args.threads}, jobs={args.jobs})"
    _log(f"training {', '.join(tasks)} into {out} ({args.jobs} at a time)")
    done = finished_tasks(tasks, out, metrics) if args.resume else set()
    if done:
        _log(f"--resume: keeping {', '.join(t for t in tasks if t in done)} (trained and measured in {out})")
    import signal

    def stop(*_):
        raise KeyboardInterrupt

    # SIGTERM (a scheduler's stop, `timeout`, `kill`) ends the run like Ctrl-C: the pool's workers are terminated
    # with it (not left training on their own) and every model resumes from its last checkpoint with --resume
    signal.signal(signal.SIGTERM, stop)
    pending, running = [t for t in tasks if t not in done], {}
    started = {}
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:  # exit terminates workers
        while pending or running:
            ready = [t for t in PRIORITY if t in pending and all(d in done or d not in tasks for d in TASK_DEPS[t])]
            while ready and len(running) < args.jobs:
                task = ready.pop(0)
                pending.remove(task)
                started[task] = (time.perf_counter(), os.getloadavg())
                running[task] = pool.apply_async(run_task, (task, str(out), args.steps_scale, args.sd_unet_steps,
                                                            args.threads, args.resume))
            finished = [t for t, job in running.items() if job.ready()]
            if not finished:
                time.sleep(1)
                continue
            for task in finished:
                name, recorded, wall = running.pop(task).get()  # a failed task stops the run with its error
                done.add(name)
                # re-read before writing so that concurrent `--only` runs do not drop each other's figures
                latest = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
                latest.setdefault("runs", {})[name] = {
                    "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "wall_seconds": wall,
                    "machine": machine, "loadavg_start": started[name][1], "loadavg_end": os.getloadavg(),
                    "steps_scale": args.steps_scale}
                latest.update(recorded)
                metrics = latest
                metrics_path.write_text(json.dumps(metrics, indent=1, default=float) + "\n")
                write_report(out, metrics)
    _log("")
    return report(out, metrics)


def cli(argv=None) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:
        _log("stopped: every model keeps its last checkpoint (every 200 steps); "
             "continue with the same command plus --resume")
        return 130


if __name__ == "__main__":
    raise SystemExit(cli())
