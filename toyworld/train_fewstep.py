"""Distil the toy Stable Diffusion into a few-step student ("toy SD-Turbo").

How it is made (``train_fewstep``):

1. the teacher is the committed ``sd`` pipeline folder. From fixed-seed noise ``z`` it samples
   latents ``x0 = teacher(z, prompt)`` with DDIM (``TEACHER_STEPS`` steps, classifier-free
   guidance ``TEACHER_CFG``), for prompts drawn from every caption template;
2. the student is a copy of the teacher's UNet (same config, initialised from its weights). It
   is trained by direct regression onto the teacher's output from the same noise, at the
   timesteps of a "trailing" schedule (999, 749, 499, 249 -- the timesteps DDIM visits with 1,
   2 or 4 steps). At timestep ``t`` it sees the point of the deterministic DDIM path through
   ``(z, x0)``: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e`` with ``e`` the noise that ``z``
   implies at t=999 (so ``x_999 = z`` exactly), predicts epsilon, and the loss is the squared
   error of its implied clean latent ``x0_hat`` against ``x0``. The student needs no
   classifier-free guidance: the teacher's guidance is baked into its targets;
3. it is saved as its own ``StableDiffusionPipeline`` folder with the teacher's VAE, text
   encoder and tokenizer, and a ``DDIMScheduler`` with ``timestep_spacing="trailing"`` (as
   SD-Turbo's), so ``pipe(prompt, num_inference_steps=1, guidance_scale=0)`` samples in one step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .scenes import sample_scenes
from .train_state import Checkpointer, clear_state, load_state, save_state
from .train_sd import SCHEDULE, _fp16_weights, _PromptCache, evaluate_pipeline, unet_step

TURBO_SEED = 6006
TEACHER_STEPS = 25
TEACHER_CFG = 5.0
TRAILING_TIMESTEPS = (999, 749, 499, 249)  # DDIM "trailing" with 1, 2 or 4 steps visits these
TIMESTEP_WEIGHTS = (0.4, 0.2, 0.25, 0.15)  # how often each is trained (one step matters most)


def turbo_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True,
                         steps_offset=0, timestep_spacing="trailing")


@torch.no_grad()
def teacher_pairs(pipe, n: int, rng: np.random.Generator, gen: torch.Generator, batch: int = 64,
                  steps: int = TEACHER_STEPS, guidance_scale: float = TEACHER_CFG, log=print):
    """``n`` (noise, teacher latents, caption) triples; latents are in the UNet's (scaled) space."""
    size = pipe.unet.config.sample_size
    channels = pipe.unet.config.in_channels
    zs, x0s, captions = [], [], []
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        b = sample_scenes(min(batch, n - i), rng, legacy_caption_prob=0.5, plain_article_prob=0.25)
        z = torch.randn((len(b), channels, size, size), generator=gen)
        out = pipe(b.captions, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=z.clone(), output_type="latent")
        zs.append(z)
        x0s.append(out.images.float())
        captions += b.captions
        log(f"[sd-turbo] teacher samples {i + len(b)}/{n} ({time.perf_counter() - t0:.0f}s)")
    return torch.cat(zs), torch.cat(x0s), captions


def train_student(teacher_unet, text_encoder, tokenizer, zs, x0s, captions, steps: int = 2400,
                  batch_size: int = 32, lr: float = 5e-4, log=print, checkpoints: Path | None = None,
                  resume: bool = False):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(TURBO_SEED + 1)
    rng = np.random.default_rng(TURBO_SEED + 1)
    unet = UNet2DConditionModel.from_config(teacher_unet.config)
    unet.load_state_dict(teacher_unet.state_dict())
    unet.train()
    alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod
    ts = torch.tensor(TRAILING_TIMESTEPS)
    probs = np.asarray(TIMESTEP_WEIGHTS) / sum(TIMESTEP_WEIGHTS)
    a_top = alphas[TRAILING_TIMESTEPS[0]]
    eps_all = (zs - a_top.sqrt() * x0s) / (1 - a_top).sqrt()  # the noise z implies at the first timestep
    prompts = _PromptCache(tokenizer, text_encoder)
    prompts(list(dict.fromkeys(captions)))
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    t0 = time.perf_counter()
    ckpt = Checkpointer(checkpoints, "sd-turbo", resume=resume, log=log,
                        objects={"unet": unet, "opt": opt, "sched": sched}, np_rng=rng)
    first, extra = ckpt.start()
    ema = extra.get("ema", ema)
    running = extra.get("running")
    for step in range(first, steps):
        idx = torch.from_numpy(rng.integers(0, len(captions), batch_size))
        t = ts[torch.from_numpy(rng.choice(len(ts), batch_size, p=probs))]
        a = alphas[t].view(-1, 1, 1, 1)
        x0, eps = x0s[idx], eps_all[idx]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        cond = prompts([captions[i] for i in idx.tolist()])
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        x0_hat = (xt - (1 - a).sqrt() * pred) / a.sqrt()
        loss = ((x0_hat - x0) ** 2).mean()
        running = unet_step(loss, unet, opt, sched, ema, step, 0.995, running)
        if step % 100 == 0 or step == steps - 1:
            log(f"[sd-turbo] step {step}/{steps} x0 loss {running:.4f} ({time.perf_counter() - t0:.0f}s)")
        ckpt.step_done(step, {"ema": ema, "running": running})
    ckpt.finish()
    unet.load_state_dict(ema)
    return unet.eval(), ckpt.elapsed()


def save_turbo_pipeline(teacher, unet, folder: str | Path) -> None:
    from diffusers import StableDiffusionPipeline

    from .tokenizer import write_clip_tokenizer

    folder = Path(folder)
    pipe = StableDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=unet, scheduler=turbo_scheduler(), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _fp16_weights(folder)
    for cfg in folder.rglob("config.json"):  # the teacher's (machine-specific) path, recorded on loading it
        data = json.loads(cfg.read_text())
        if data.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    write_clip_tokenizer(folder / "tokenizer")


def train_fewstep(out_dir: str | Path, teacher_folder: str | Path, n_pairs: int = 2048, steps: int = 2400,
                  lr: float = 5e-4, log=print, resume: bool = False) -> dict:
    """Sample teacher pairs, train the student, save the pipeline, judge it at 1, 2 and 4 steps. With
    ``resume`` a stopped run reuses its teacher pairs and continues the student from its checkpoint."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(TURBO_SEED)
    rng = np.random.default_rng(TURBO_SEED)
    gen = torch.Generator().manual_seed(TURBO_SEED)
    teacher = StableDiffusionPipeline.from_pretrained(str(teacher_folder))
    teacher.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    checkpoints = Path(out_dir) / ".training"
    pairs = load_state(checkpoints, "sd-turbo-pairs") if resume else None
    if pairs is None:
        zs, x0s, captions = teacher_pairs(teacher, n_pairs, rng, gen, log=log)
        save_state(checkpoints, "sd-turbo-pairs", {"zs": zs, "x0s": x0s, "captions": captions,
                                                    "seconds": time.perf_counter() - t0})
    else:
        zs, x0s, captions = pairs["zs"], pairs["x0s"], pairs["captions"]
        log(f"[sd-turbo] resumed: {len(captions)} teacher pairs from {checkpoints}")
    teacher_time = pairs["seconds"] if pairs else time.perf_counter() - t0
    unet, student_time = train_student(teacher.unet, teacher.text_encoder, teacher.tokenizer, zs, x0s, captions,
                                       steps=steps, lr=lr, log=log, checkpoints=checkpoints, resume=resume)
    save_turbo_pipeline(teacher, unet, out_dir)
    clear_state(checkpoints, "sd-turbo-pairs")
    samples = {}
    for k in (1, 2, 4):
        m = evaluate_pipeline(out_dir, steps=k, guidance_scale=0.0)
        m.pop("images")
        samples[str(k)] = m
        log(f"[sd-turbo] {k} step(s), no CFG: judged {m['judge_by_category']}")
    return {
        "name": "sd_turbo",
        "seed": TURBO_SEED,
        "teacher": {"folder": Path(teacher_folder).name, "steps": TEACHER_STEPS, "guidance_scale": TEACHER_CFG,
                    "scheduler": type(teacher.scheduler).__name__, "n_pairs": n_pairs, "seconds": teacher_time},
        "student": {"steps": steps, "batch_size": 32, "lr": lr, "timesteps": list(TRAILING_TIMESTEPS),
                    "timestep_weights": list(TIMESTEP_WEIGHTS), "seconds": student_time,
                    "params": sum(p.numel() for p in unet.parameters())},
        "samples": samples,
        "train_seconds": teacher_time + student_time,
    }
