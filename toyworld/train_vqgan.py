"""Train the toy VQGAN and save it in taming-transformers' layout.

The model is taming's ``VQModel`` without the Lightning wrapper: ``Encoder`` -> ``quant_conv``
-> ``VectorQuantizer2`` -> ``post_quant_conv`` -> ``Decoder``, built from taming's own modules
(``taming.modules.diffusionmodules.model`` and ``taming.modules.vqvae.quantize``; never
``taming.main`` / ``taming.models``, which need dead pytorch-lightning APIs).

Saved as ``config.yaml`` (taming's config layout, ``target: taming.models.vqgan.VQModel``) and
``model.safetensors`` holding the state dict under taming's key names (``encoder.*``,
``decoder.*``, ``quantize.embedding.weight``, ``quant_conv.*``, ``post_quant_conv.*``).

Training: L1 + MSE reconstruction in taming's [-1, 1] range plus the VQ codebook/commitment
loss (no LPIPS and no discriminator: their weights cannot be downloaded). The codebook is
initialised from encoder outputs and dead codes are re-seeded from recent encoder outputs, so
the whole codebook stays in use. To keep the decoder sensible for latents that are near, but
not on, the codebook (as when a generator optimises z through straight-through quantisation),
a share of training batches also decodes lightly perturbed codes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import world
from .evaluation import reconstruction_scores
from .scenes import sample_scenes
from .train_state import Checkpointer

VQGAN_SEED = 3003
VQGAN_CONFIG = {
    "model": {
        "base_learning_rate": 4.5e-06,  # taming's customary value; this trainer uses its own lr (see TRAINING.md)
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": 32,
            "n_embed": 512,
            "ddconfig": {
                "double_z": False,
                "z_channels": 64,
                "resolution": 64,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 2],  # f=2: 32x32 codes for a 64-px scene (f=4's 16x16 lost the smallest shapes)
                "num_res_blocks": 1,  # v3: one per level, for crisp small shapes
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
        },
    }
}
BETA = 0.25  # taming's commitment weight


class ToyVQModel(nn.Module):
    """taming's VQModel module layout (same attribute, hence state-dict key, names)."""

    def __init__(self, embed_dim: int, n_embed: int, ddconfig: dict, **_ignored):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=BETA, remap=None, sane_index_shape=False)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latent before quantisation (x in [-1, 1])."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        quant, emb_loss, info = self.quantize(self.encode_pre(x))
        return quant, emb_loss, info

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor):
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff


def build_vqgan(config: dict) -> ToyVQModel:
    params = config["model"]["params"]
    return ToyVQModel(params["embed_dim"], params["n_embed"], dict(params["ddconfig"]))


def load_vqgan(folder: str | Path) -> ToyVQModel:
    """Load ``config.yaml`` + ``model.safetensors`` from ``folder`` (strict keys, float32, eval)."""
    import yaml
    from safetensors.torch import load_file

    folder = Path(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    model = build_vqgan(config)
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_vqgan(model: ToyVQModel, folder: str | Path, config: dict = VQGAN_CONFIG) -> None:
    import yaml
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _batch(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Toy world v3 scenes (1-3 objects, all five categories) in taming's [-1, 1]."""
    return sample_scenes(n, rng).tensors() * 2 - 1


@torch.no_grad()
def evaluate(model: ToyVQModel, n: int = 256, seed: int = 888_888) -> dict:
    """Reconstruction quality on held-out world images, in [0, 1] pixels, plus codebook use."""
    from .judge import accuracy, judge_batch

    model.eval()
    batch = world.sample(n, seed)
    x = batch.tensors()
    recs, idx = [], []
    for chunk in x.split(64):
        quant, _, (_, _, ind) = model.encode(chunk * 2 - 1)
        recs.append(((model.decode(quant) + 1) / 2).clamp(0, 1))
        idx.append(ind.flatten())
    rec = torch.cat(recs)
    idx = torch.cat(idx)
    mse_per = ((rec - x) ** 2).flatten(1).mean(1)
    mse = float(mse_per.mean())
    counts = torch.bincount(idx, minlength=model.quantize.n_e).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    acc = accuracy(judge_batch(rec), batch.colours, batch.shapes, batch.backgrounds)
    per_category = reconstruction_scores(lambda im: (model.decode(model.encode(im * 2 - 1)[0]) + 1) / 2)
    return {
        "judge_by_category": per_category,
        "mse": mse,
        "psnr_db": float(10 * math.log10(1.0 / mse)),
        "psnr_db_mean_per_image": float((10 * torch.log10(1.0 / mse_per)).mean()),
        "codes_used": int((counts > 0).sum()),
        "n_embed": int(model.quantize.n_e),
        "perplexity": perplexity,
        "judge_on_reconstructions": acc,
        "n_images": n,
    }


def train_vqgan(out_dir: str | Path, steps: int = 3000, batch_size: int = 8, lr: float = 2e-3, log=print,
                resume: bool = False) -> dict:
    """Train the toy VQGAN from its fixed seed and save it to ``out_dir``. Returns metrics. With ``resume``
    a stopped run continues from its last checkpoint in ``out_dir`` (same final weights)."""
    t0 = time.perf_counter()
    torch.manual_seed(VQGAN_SEED)
    rng = np.random.default_rng(VQGAN_SEED)
    model = build_vqgan(VQGAN_CONFIG)
    model.train()
    codebook = model.quantize.embedding.weight
    n_e = model.quantize.n_e
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    usage = torch.zeros(n_e)
    ckpt = Checkpointer(Path(out_dir) / ".training", "vqgan", resume=resume, log=log,
                        objects={"model": model, "opt": opt, "sched": sched}, np_rng=rng)
    first, extra = ckpt.start()
    usage = extra.get("usage", usage)
    recent: list[torch.Tensor] = list(extra.get("recent", []))
    restarts = extra.get("restarts", 0)
    running = extra.get("running")
    for step in range(first, steps):
        x = _batch(batch_size, rng)
        z = model.encode_pre(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if step == 0:  # data-dependent codebook init
            with torch.no_grad():
                pick = torch.randint(0, flat.shape[0], (n_e,))
                codebook.copy_(flat[pick].detach() + 0.01 * torch.randn_like(codebook))
        quant, vq_loss, (_, _, ind) = model.quantize(z)
        if step % 4 == 3:  # decode codes jittered around the codebook, as a z-optimiser produces
            quant = quant + 0.1 * quant.detach().std() * torch.randn_like(quant)
        rec = model.decode(quant)
        rec_loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            usage.mul_(0.97).add_(torch.bincount(ind.flatten(), minlength=n_e).float())
            recent.append(flat.detach())
            recent = recent[-8:]
            if step % 25 == 24 and step < int(0.9 * steps):  # re-seed dead codes
                dead = torch.nonzero(usage < 0.03).flatten()
                if len(dead):
                    pool = torch.cat(recent)
                    pick = torch.randint(0, pool.shape[0], (len(dead),))
                    codebook[dead] = pool[pick] + 0.01 * pool.std() * torch.randn(len(dead), pool.shape[1])
                    usage[dead] = 1.0
                    restarts += len(dead)
        running = rec_loss.item() if running is None else 0.95 * running + 0.05 * rec_loss.item()
        if step % 100 == 0 or step == steps - 1:
            live = int((usage > 0.03).sum())
            log(f"[vqgan] step {step}/{steps} rec {running:.4f} vq {vq_loss.item():.4f} live codes {live} ({time.perf_counter() - t0:.0f}s)")
        ckpt.step_done(step, {"usage": usage, "recent": recent, "restarts": restarts, "running": running})
    train_time = ckpt.elapsed()
    save_vqgan(model, out_dir)
    ckpt.finish()
    metrics = evaluate(load_vqgan(out_dir))
    metrics.update(
        {"name": "vqgan", "seed": VQGAN_SEED, "steps": steps, "batch_size": batch_size, "lr": lr,
         "code_restarts": restarts, "params": sum(p.numel() for p in model.parameters()), "train_seconds": train_time}
    )
    return metrics
