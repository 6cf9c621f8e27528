"""Train the toy Stable Diffusion and save it as a diffusers ``StableDiffusionPipeline`` folder.

Components:

* ``vae``: a small ``AutoencoderKL`` trained here on the world (64x64x3 -> 16x16x4 latents,
  vae_scale_factor 4), L1 + MSE reconstruction plus a small KL term; its ``scaling_factor`` is set to
  1 / std of its latents so scaled latents have unit variance;
* ``text_encoder`` + ``tokenizer``: toy CLIP A's text tower as a ``CLIPTextModel`` with the
  real CLIP tokenizer, frozen;
* ``unet``: a small ``UNet2DConditionModel`` (cross-attention dim = text hidden size) trained
  for epsilon prediction under SD's ``scaled_linear`` beta schedule, with the caption dropped
  10% of the time (replaced by the empty prompt) so classifier-free guidance works, and with
  "offset noise" (see ``OFFSET_NOISE``) so that it takes the background colour from the prompt;
* ``scheduler``: ``DDIMScheduler`` with the training schedule; no safety checker.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import world
from .evaluation import held_out_prompts, reconstruction_scores
from .rule import category_scores, judge
from .scenes import sample_scenes
from .tokenizer import write_clip_tokenizer
from .train_state import Checkpointer

SD_SEED = 4004
VAE_SEED = 4005
DECODER_SEED = 4006
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CFG_DROP = 0.1
# "offset noise": a per-image, per-channel constant added to the training noise. With flat
# backgrounds on a 16x16 latent the channel means of x_T still carry the background colour under
# SD's schedule (sqrt(alpha_bar_T) = 0.068 vs a noise mean of std 1/16), so a UNet trained on plain
# noise reads the background off the initial noise and ignores the prompt; with the offset it
# cannot, and has to take the background from the text.
OFFSET_NOISE = 0.3

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    # three blocks: 64x64 -> 16x16 latents (diffusers' vae_scale_factor = 2 ** (3 - 1) = 4); with
    # 8x8 latents the colours of small shapes and even of the background came back wrong
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    # one group: GroupNorm then normalises over all channels (a LayerNorm) and keeps the relative
    # channel levels that carry a flat region's absolute colour; with one channel per group it
    # acts as instance norm and erases that colour -- fatal in a world of two flat colours
    norm_num_groups=1,
    sample_size=64,
)
LATENT_SIZE = 16  # 64x64 images -> 16x16x4 latents

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(48, 96, 96),  # v3: wider than v2 (32, 64, 64) for scenes of 1-3 objects
    layers_per_block=1,
    attention_head_dim=2,  # diffusers' legacy name: the number of heads (head dim 24-48)
    norm_num_groups=16,
)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------
def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


@torch.no_grad()
def evaluate_vae(vae, n: int = 256, seed: int = 999_999) -> dict:
    from .judge import accuracy, judge_batch

    vae.eval()
    batch = world.sample(n, seed)
    x = batch.tensors()
    recs = []
    for chunk in x.split(64):
        z = vae.encode(chunk * 2 - 1).latent_dist.mode()
        recs.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    rec = torch.cat(recs)
    mse = float(((rec - x) ** 2).mean())
    acc = accuracy(judge_batch(rec), batch.colours, batch.shapes, batch.backgrounds)
    per_category = reconstruction_scores(lambda im: (vae.decode(vae.encode(im * 2 - 1).latent_dist.mode()).sample + 1) / 2)
    return {"judge_by_category": per_category, "mse": mse, "psnr_db": 10 * math.log10(1 / mse), "judge_on_reconstructions": acc, "n_images": n}


def train_vae(steps: int = 1600, batch_size: int = 8, lr: float = 2e-3, kl_weight: float = 1e-5,
              betas: tuple[float, float] = (0.5, 0.9), log=print, checkpoints: Path | None = None, resume: bool = False,
              base=None, seed: int = VAE_SEED, name: str = "sd-vae"):
    """Train the toy SD's ``AutoencoderKL`` from scratch, or with ``base`` fine-tune only its decoder: the
    encoder, and with it the latent space a UNet was trained in, stays bit for bit as it is (as Stability's
    ``sd-vae-ft-mse`` did for SD 1.x). Returns (vae, training seconds)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build_vae().train() if base is None else base.train()
    if base is not None:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=lr, betas=betas)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    t0 = time.perf_counter()
    ckpt = Checkpointer(checkpoints, name, resume=resume, log=log,
                        objects={"vae": vae, "opt": opt, "sched": sched}, np_rng=rng)
    first, extra = ckpt.start()
    running = extra.get("running")
    for step in range(first, steps):
        x = sample_scenes(batch_size, rng).tensors() * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        kl = post.kl().mean() / (x.shape[-1] * x.shape[-2])
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = rec_loss.item() if running is None else 0.95 * running + 0.05 * rec_loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"[{name}] step {step}/{steps} rec {running:.4f} kl {kl.item():.2f} ({time.perf_counter() - t0:.0f}s)")
        ckpt.step_done(step, {"running": running})
    ckpt.finish()
    return vae.eval(), ckpt.elapsed()


# ---------------------------------------------------------------------------------------------
# Text encoder: CLIP A's text tower
# ---------------------------------------------------------------------------------------------
def text_encoder_from_clip(clip_folder: str | Path):
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(str(clip_folder)).float()
    text = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattens CLIPTextModel; older versions nest the tower under .text_model
    target = getattr(text, "text_model", text)
    target.load_state_dict(clip.text_model.state_dict(), strict=True)
    return text.float().eval()


class _PromptCache:
    """Frozen-text-encoder hidden states of each distinct prompt, padded to 77 like the pipeline."""

    def __init__(self, tokenizer, text_encoder):
        self.tok, self.enc = tokenizer, text_encoder
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for i in range(0, len(new), 256):
            chunk = new[i : i + 256]
            ids = self.tok(chunk, padding="max_length", max_length=self.tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            hidden = self.enc(ids)[0]
            for p, h in zip(chunk, hidden):
                self.cache[p] = h
        return torch.stack([self.cache[p] for p in prompts])


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------
def build_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG, cross_attention_dim=cross_attention_dim)


def _encode_dataset(vae, n: int, rng: np.random.Generator, chunk: int = 128):
    """Latent mean/std of ``n`` fresh world v3 scenes and their captions (v3 prompts; half of the single-object
    scenes with a v2 template caption)."""
    means, stds, captions = [], [], []
    with torch.no_grad():
        for i in range(0, n, chunk):
            b = sample_scenes(min(chunk, n - i), rng, legacy_caption_prob=0.5, plain_article_prob=0.25)
            dist = vae.encode(b.tensors() * 2 - 1).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            captions += b.captions
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def unet_step(loss: torch.Tensor, unet: torch.nn.Module, opt, sched, ema: dict, step: int, max_decay: float,
              running: float | None) -> float:
    """One UNet training step of the toy trainers: backward, gradient-norm clip at 1, optimiser and lr
    schedule step, EMA update (decay warming up to *max_decay*); returns the running mean of the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    sched.step()
    ema_update(ema, unet, min(max_decay, (1 + step) / (10 + step)))
    return loss.item() if running is None else 0.98 * running + 0.02 * loss.item()


def ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    """Move the exponential moving average *ema* (a state dict) towards *model*'s weights."""
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


def train_unet(vae, text_encoder, tokenizer, steps: int = 1300, batch_size: int = 48, lr: float = 1e-3,
               n_data: int = 20000, offset_noise: float = OFFSET_NOISE, log=print, checkpoints: Path | None = None,
               resume: bool = False):
    from diffusers import DDPMScheduler

    torch.manual_seed(SD_SEED)
    rng = np.random.default_rng(SD_SEED)
    t0 = time.perf_counter()
    means, stds, captions = _encode_dataset(vae, n_data, rng)
    scaling = float(1.0 / (means + stds * torch.randn_like(stds)).std())
    prompts = _PromptCache(tokenizer, text_encoder)
    prompts(list(dict.fromkeys(captions)) + [""])
    noise_sched = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction
    unet = build_unet(text_encoder.config.hidden_size).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    log(f"[sd-unet] {sum(p.numel() for p in unet.parameters())} params, latent scaling {scaling:.4f}, "
        f"{len(prompts.cache)} prompts cached ({time.perf_counter() - t0:.0f}s)")
    ckpt = Checkpointer(checkpoints, "sd-unet", resume=resume, log=log,
                        objects={"unet": unet, "opt": opt, "sched": sched}, np_rng=rng)
    first, extra = ckpt.start()
    ema = extra.get("ema", ema)
    running = extra.get("running")
    for step in range(first, steps):
        idx = torch.from_numpy(rng.integers(0, len(captions), batch_size))
        latents = (means[idx] + stds[idx] * torch.randn_like(stds[idx])) * scaling
        caps = ["" if rng.uniform() < CFG_DROP else captions[i] for i in idx.tolist()]
        cond = prompts(caps)
        noise = torch.randn_like(latents)
        noise = noise + offset_noise * torch.randn(batch_size, latents.shape[1], 1, 1)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,))
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = (weight[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        running = unet_step(loss, unet, opt, sched, ema, step, 0.998, running)
        if step % 100 == 0 or step == steps - 1:
            log(f"[sd-unet] step {step}/{steps} loss {running:.4f} ({time.perf_counter() - t0:.0f}s)")
        ckpt.step_done(step, {"ema": ema, "running": running})
    ckpt.finish()
    unet.load_state_dict(ema)
    return unet.eval(), scaling, ckpt.elapsed()


# ---------------------------------------------------------------------------------------------
# Pipeline folder and evaluation
# ---------------------------------------------------------------------------------------------
def _fp16_weights(folder: Path) -> None:
    """Store every safetensors file of the pipeline in fp16 (the configs keep float32)."""
    from safetensors.torch import load_file, save_file

    for f in folder.rglob("*.safetensors"):
        state = load_file(str(f))
        save_file({k: v.to(torch.float16).contiguous() if v.is_floating_point() else v for k, v in state.items()},
                  str(f), metadata={"format": "pt"})
    for cfg in folder.rglob("config.json"):
        data = json.loads(cfg.read_text())
        if "torch_dtype" in data or "dtype" in data or "architectures" in data:  # transformers configs
            data.pop("torch_dtype", None)
            data["dtype"] = "float32"
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pipeline(vae, unet, text_encoder, tokenizer, scaling: float, folder: str | Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    vae.register_to_config(scaling_factor=scaling)
    scheduler = DDIMScheduler(**SCHEDULE, prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _fp16_weights(folder)
    # the tokenizer folder in the layout of the released SD repos: vocab.json + merges.txt
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    write_clip_tokenizer(folder / "tokenizer")


def eval_prompts(n: int = 64, seed: int = 31337) -> list[tuple[str, str, str, str]]:
    """``n`` fixed (prompt, colour, shape, background) triples, "a {colour} {shape} on a {colour} background"."""
    rng = np.random.default_rng(seed)
    table = world.all_full_captions()
    pick = rng.choice(len(table), size=n, replace=False)
    return [table[i] for i in pick]


@torch.no_grad()
def evaluate_pipeline(folder: str | Path, per_category: int = 16, steps: int = 30, guidance_scale: float = 5.0,
                      seed: int = 0, batch: int = 40) -> dict:
    """Sample one image per held-out prompt (``evaluation.held_out_prompts``) through
    ``StableDiffusionPipeline`` and judge it by the rule: per-category accuracy and overall."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))  # fp16 files load as float32
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts(per_category)
    images = []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        out = pipe([p.text for p in chunk], height=64, width=64, num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=gen, output_type="pt")
        images.append(out.images.float().cpu())
    images = torch.cat(images)
    scores = category_scores(prompts, judge(images, prompts))
    return {"n_images": len(prompts), "steps": steps, "scheduler": type(pipe.scheduler).__name__,
            "guidance_scale": guidance_scale, "seed": seed, "judge_by_category": scores, "images": images}


VAE_RECIPE = dict(batch_size=8, lr=2e-3, kl_weight=1e-5)
# the decoder fine-tune: from scratch the VAE drew small crosses and triangles back as circles and squares and
# merged close pairs (97.5% of a tuning set right by the rule); 3000 more steps on the decoder alone: 99.5%
# (lr 1e-3; 5e-4 gave 98.9%) -- and the latents, so the UNet and its few-step student, do not change
DECODER_RECIPE = dict(VAE_RECIPE, lr=1e-3)


def vae_stage(out_dir: str | Path, vae_steps: int = 3000, decoder_steps: int = 3000, log=print, resume: bool = False):
    """The VAE of the pipeline in ``out_dir``: trained, then its decoder fine-tuned (checkpointing into
    ``out_dir/.training``), and kept in ``out_dir/.training/vae`` until the pipeline is saved, so that a resumed
    run does not train it again. It needs no text encoder, so it may run before CLIP A exists.
    Returns (vae, {"vae": seconds, "decoder": seconds})."""
    from diffusers import AutoencoderKL

    training = Path(out_dir) / ".training"
    done, base_done = training / "vae", training / "vae-base"
    for folder in (done, base_done):
        if resume and (folder / "config.json").is_file():
            log(f"[sd-vae] resumed: {folder.name} finished earlier ({folder})")
            vae, seconds = AutoencoderKL.from_pretrained(str(folder)), json.loads((folder / "train_seconds.json").read_text())
            seconds = seconds if isinstance(seconds, dict) else {"vae": seconds}
            break
    else:
        folder = None
        vae, base_seconds = train_vae(steps=vae_steps, log=log, checkpoints=training, resume=resume, **VAE_RECIPE)
        seconds = {"vae": base_seconds}
        _save_vae(vae, seconds, base_done)
    if folder != done:
        if decoder_steps:
            vae, seconds["decoder"] = train_vae(steps=decoder_steps, log=log, checkpoints=training, resume=resume,
                                                base=vae, seed=DECODER_SEED, name="sd-vae-decoder", **DECODER_RECIPE)
        _save_vae(vae, seconds, done)
        shutil.rmtree(base_done, ignore_errors=True)
    return vae.eval(), seconds


def _save_vae(vae, seconds: dict, folder: Path) -> None:
    vae.save_pretrained(str(folder), safe_serialization=True)
    (folder / "train_seconds.json").write_text(json.dumps(seconds))


def train_sd(out_dir: str | Path, clip_folder: str | Path, vae_steps: int = 3000, decoder_steps: int = 3000,
             unet_steps: int = 8000, log=print, resume: bool = False, vae_ready: bool = False, n_data: int = 20000) -> dict:
    """Train the VAE, then the UNet on CLIP A's frozen text tower; save the pipeline; evaluate. With
    ``resume`` a stopped run continues where it stopped (a finished VAE is kept in ``out_dir/.training``);
    ``vae_ready``: :func:`vae_stage` has just trained the VAE (``train_toy.py`` runs it as its own task)."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    checkpoints = out_dir / ".training"
    vae, vae_seconds = vae_stage(out_dir, vae_steps, decoder_steps, log=log, resume=resume or vae_ready)
    vae_time = sum(vae_seconds.values())
    vae_metrics = evaluate_vae(vae)
    log(f"[sd-vae] held-out PSNR {vae_metrics['psnr_db']:.2f} dB, judge on reconstructions "
        f"{vae_metrics['judge_on_reconstructions']}")
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_folder))
    text_encoder = text_encoder_from_clip(clip_folder)
    unet_recipe = dict(batch_size=48, lr=1e-3, offset_noise=OFFSET_NOISE)
    unet, scaling, unet_time = train_unet(vae, text_encoder, tokenizer, steps=unet_steps, log=log, n_data=n_data,
                                          checkpoints=checkpoints, resume=resume, **unet_recipe)
    save_pipeline(vae, unet, text_encoder, tokenizer, scaling, out_dir)
    shutil.rmtree(checkpoints / "vae", ignore_errors=True)
    sample_metrics = evaluate_pipeline(out_dir)
    sample_metrics.pop("images")
    log(f"[sd] samples, {sample_metrics['steps']} steps, CFG {sample_metrics['guidance_scale']}: {sample_metrics['judge_by_category']}")
    more = []
    for g in (3.0, 7.5):  # the same prompts and seed at other guidance scales
        m = evaluate_pipeline(out_dir, guidance_scale=g)
        m.pop("images")
        more.append(m)
        log(f"[sd] samples, {m['steps']} steps, CFG {g}: {m['judge_by_category']}")
    return {
        "name": "sd",
        "vae": {**vae_metrics, "steps": vae_steps, "seed": VAE_SEED, "train_seconds": vae_time,
                "decoder_finetune": {"steps": decoder_steps, "seed": DECODER_SEED, "lr": DECODER_RECIPE["lr"],
                                     "train_seconds": vae_seconds.get("decoder", 0.0)},
                "params": sum(p.numel() for p in vae.parameters()), "scaling_factor": scaling,
                "latent_shape": [VAE_CONFIG["latent_channels"], LATENT_SIZE, LATENT_SIZE],
                "recipe": {**VAE_RECIPE, "block_out_channels": list(VAE_CONFIG["block_out_channels"]),
                           "norm_num_groups": VAE_CONFIG["norm_num_groups"]}},
        "unet": {"steps": unet_steps, "seed": SD_SEED, "train_seconds": unet_time, "n_data": n_data,
                 "params": sum(p.numel() for p in unet.parameters()), **unet_recipe,
                 "block_out_channels": list(UNET_CONFIG["block_out_channels"])},
        "samples": sample_metrics,
        "more_samples": more,
        "train_seconds": vae_time + unet_time,
    }
