"""The one latent-optimisation loop: render -> objective -> backward -> step -> project -> callback.

Every backend that optimises a latent behind a differentiable renderer (VQGAN codes, raw or
Fourier pixels, a diffusion model's starting noise) runs :func:`optimise`; the backend itself is a
``render`` function, a starting latent and settings. The loop tracks the best iterate per image
(optional), stops when a callback returns ``False`` (``stopped_at``) and keeps the current state on
Ctrl-C (``interrupted``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .base import StepCallback, StepInfo, option

if TYPE_CHECKING:
    from .runs.checkpoint import Checkpointer

OPTIMIZERS = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad,
    "adamax": torch.optim.Adamax, "radam": torch.optim.RAdam, "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}
OPTIMIZER_NAMES = ("Adam", "AdamW", "Adagrad", "Adamax", "RAdam", "RMSprop", "SGD")
LR_SCHEDULES = ("constant", "cosine", "step", "linear")


@dataclass
class OptimiseSettings:
    """Settings of the shared loop; a latent-optimisation backend's ``Settings`` subclasses this."""

    iterations: int = option(300, "optimisation steps", metavar="N", minimum=0)
    learning_rate: float = option(0.1, "optimiser learning rate", flag="--lr", above=0)
    optimizer: str = option("Adam", "torch optimiser: " + ", ".join(OPTIMIZER_NAMES), aliases=["--optimiser"])
    lr_schedule: str = option("constant", "learning-rate schedule: constant; cosine (to 10% of --lr); step (halve "
                                          "every third of the run); linear (to 10%)", choices=LR_SCHEDULES)
    grad_clip: float | None = option(None, "clip the gradient norm of each image's latents to this value (none: no clipping)",
                                     above=0)
    keep_best: bool = option(False, "return each image's best iterate by the objective, not the last one")
    checkpoint_every: int = option(0, "write a resumable checkpoint (run folder: checkpoint.safetensors + .json) "
                                      "every N steps and at the end; one is always written on Ctrl-C or a stop; "
                                      "continue with --resume RUN_FOLDER", metavar="N", minimum=0)


def check_optimizer(name: str, lr: float) -> None:
    """One-line errors for an unknown optimiser or a learning rate that is not a positive finite number."""
    if str(name).lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate is {lr}; it must be a positive finite number (e.g. --lr 0.1)")


def make_optimizer(name: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimiser by case-insensitive name (extra keyword arguments passed on)."""
    check_optimizer(name, lr)
    return OPTIMIZERS[str(name).lower()](params, lr=lr, **kwargs)


def _has_fused(name: str) -> bool:
    import inspect

    return "fused" in inspect.signature(OPTIMIZERS[str(name).lower()].__init__).parameters


def make_lr_schedule(name: str, optimizer: torch.optim.Optimizer, steps: int):
    """``None`` for a constant rate, else a ``torch.optim.lr_scheduler`` over *steps* steps."""
    from torch.optim import lr_scheduler

    key = str(name).lower()
    steps = max(1, steps)
    if key == "constant":
        return None
    if key == "cosine":
        base = optimizer.param_groups[0]["lr"]
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.1 * base)
    if key == "step":
        return lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 3), gamma=0.5)
    if key == "linear":
        return lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=steps)
    raise ValueError(f"unknown lr_schedule {name!r}; choose from {', '.join(LR_SCHEDULES)}")


def check_settings(s: OptimiseSettings) -> None:
    """Validate the loop's settings before any model loads."""
    if s.iterations < 0:
        raise ValueError(f"iterations is {s.iterations}; it must be 0 or more")
    check_optimizer(s.optimizer, s.learning_rate)
    if str(s.lr_schedule).lower() not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {s.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    if s.grad_clip is not None and not (math.isfinite(s.grad_clip) and s.grad_clip > 0):
        raise ValueError(f"grad_clip is {s.grad_clip}; give a positive number or none")


@dataclass
class OptimiseResult:
    """What :func:`optimise` hands back; ``latents`` are the final (or, with ``keep_best``, best) ones."""

    latents: Any
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_at: int | None = None
    interrupted: bool = False
    best_step: list[int] | None = None
    best_loss: list[float] | None = None


def _as_list(latents) -> list[torch.Tensor]:
    return [latents] if isinstance(latents, torch.Tensor) else list(latents)


def _rebuild(template, tensors: list[torch.Tensor]):
    return tensors[0] if isinstance(template, torch.Tensor) else type(template)(tensors)


def clip_grad_norm_per_image(params: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` for each image on its own: the gradient of image ``i`` (index ``i`` of
    dim 0 of every tensor) is scaled by ``min(1, max_norm / (||g_i|| + 1e-6))``, so the images of a batch stay
    independent, each clipped as ReNO clips its one image (ExplainableML/ReNO training/trainer.py L128)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sizes = {g.shape[0] for g in grads}
    if len(sizes) != 1:
        raise ValueError(f"per-image gradient clipping needs every latent tensor batch-first with one batch size; "
                         f"got first dimensions {sorted(sizes)}")
    norms = torch.stack([g.detach().flatten(1).double().pow(2).sum(1) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))


def optimise(latents, render: Callable[[Any], torch.Tensor], objective, *, optimizer: str = "Adam",
             lr: float = 0.1, schedule: str = "constant", steps: int = 100,
             project: Callable[[Any], None] | None = None,
             regulariser: Callable[[Any, int], "torch.Tensor | dict[str, torch.Tensor]"] | None = None,
             callback: StepCallback | None = None, generator: torch.Generator | None = None,
             decode: Callable[[Any], torch.Tensor] | None = None, keep_best: bool = False,
             grad_clip: float | None = None, optimizer_kwargs: dict | None = None,
             checkpoint: Checkpointer | None = None,
             grad_scaler: torch.amp.GradScaler | None = None) -> OptimiseResult:
    """Optimise *latents* (a leaf tensor ``[B, ...]`` or a list of them) so that ``render(latents)``
    (images ``[B,3,H,W]`` in ``[0,1]``, differentiable) lowers ``objective``.

    Each step: ``render`` -> ``objective(images, step=, generator=)`` (``None``: no objective) plus
    ``regulariser(latents, step)`` (``[B]`` or ``{name: [B]}``) -> backward -> optional gradient-norm
    clipping, per image (:func:`clip_grad_norm_per_image`) -> optimiser step -> lr schedule -> ``project(latents)`` (in place, no grad) -> callback.
    ``losses`` holds, per step, the mean over images of the per-image loss. With ``keep_best`` the
    returned latents are, per image, those that scored lowest (the loss of a step belongs to the
    latents it rendered, before that step's update) by the objective alone, without the regulariser; this
    needs every latent to have the batch first.
    ``decode(latents)`` renders images for the callback (default: ``render`` without gradients).
    ``checkpoint`` (:class:`generators.runs.checkpoint.Checkpointer`) starts from a saved state and saves the
    state after each step it is due, and when the run ends early (Ctrl-C: the latents of the last whole step).
    ``grad_scaler`` (fp16): the loss is scaled for the backward and a step whose gradient overflowed is
    skipped; the optimiser is then the fused one where torch has it, which reads the overflow flag on the
    device (no host sync per step).
    """
    tensors = _as_list(latents)
    if not tensors or not all(t.is_leaf for t in tensors):
        raise ValueError("optimise needs leaf tensors as latents (create them with requires_grad_())")
    for t in tensors:
        t.requires_grad_(True)
    params = tensors
    fused = {"fused": True} if grad_scaler is not None and _has_fused(optimizer) else {}
    opt = make_optimizer(optimizer, params, lr, **fused, **(optimizer_kwargs or {}))
    lr_schedule = make_lr_schedule(schedule, opt, steps)
    decode = decode if decode is not None else (lambda z: render(z).detach())
    losses: list[torch.Tensor] = []
    result = OptimiseResult(latents=latents)
    best: list[torch.Tensor] | None = None
    best_loss: torch.Tensor | None = None
    best_step: torch.Tensor | None = None
    start, last_whole = 0, None
    if checkpoint is not None and checkpoint.resume is not None:
        from .runs.checkpoint import restore

        state = last_whole = checkpoint.resume
        restore(state, tensors, opt, lr_schedule, generator)
        start = result.steps_done = state.step
        device = tensors[0].device
        losses = [torch.tensor(x, dtype=torch.float32, device=device) for x in state.losses]
        if keep_best and state.best is not None:
            best = [b.to(t.device, t.dtype) for b, t in zip(state.best, tensors)]
            best_loss, best_step = state.best_loss.to(device), state.best_step.to(device)

    def whole_step(step: int):
        from .runs.checkpoint import snapshot

        return snapshot(step, steps, tensors, opt, lr_schedule, generator, losses, best, best_loss, best_step)

    def decode_now() -> torch.Tensor:
        with torch.no_grad():
            return decode(_rebuild(latents, [t.detach() for t in tensors]))

    try:
        for step in range(start, steps):
            opt.zero_grad(set_to_none=True)
            images = render(latents)
            parts: dict[str, torch.Tensor] = {}
            per_image = images.new_zeros(images.shape[0], dtype=torch.float32)
            if objective is not None:
                out = objective(images, step=step, generator=generator)
                per_image = per_image + out.per_image.float()
                parts.update(out.parts)
            scored = per_image.detach()      # the best iterate is judged by the objective alone
            if regulariser is not None:
                reg = regulariser(latents, step)
                for name, value in (reg.items() if isinstance(reg, dict) else (("regulariser", reg),)):
                    value = value.float().expand(per_image.shape) if value.dim() == 0 else value.float()
                    per_image = per_image + value
                    parts[name] = value.detach()
            if keep_best:
                with torch.no_grad():
                    if best is None:
                        best = [t.detach().clone() for t in tensors]
                        best_loss, best_step = scored.clone(), torch.zeros_like(scored, dtype=torch.long)
                    else:
                        better = scored < best_loss
                        for kept, t in zip(best, tensors):
                            mask = better.view(-1, *([1] * (t.dim() - 1)))
                            kept.copy_(torch.where(mask, t.detach(), kept))
                        best_loss = torch.where(better, scored, best_loss)
                        best_step = torch.where(better, torch.full_like(best_step, step), best_step)
            total = per_image.sum()
            if total.requires_grad:
                (total if grad_scaler is None else grad_scaler.scale(total)).backward()
                if grad_clip is not None:
                    if grad_scaler is not None:
                        grad_scaler.unscale_(opt)
                    clip_grad_norm_per_image(params, grad_clip)
                if grad_scaler is None:
                    opt.step()
                else:
                    grad_scaler.step(opt)       # skipped when the scaled gradient overflowed
                    grad_scaler.update()
            if lr_schedule is not None:
                lr_schedule.step()
            if project is not None:
                with torch.no_grad():
                    project(latents)
            loss = per_image.detach().mean()
            losses.append(loss)
            result.steps_done = step + 1
            if checkpoint is not None:
                last_whole = whole_step(step + 1)
                if checkpoint.due(step + 1, steps):
                    checkpoint.save(last_whole)
            if callback is not None:
                keep_going = callback(StepInfo(step=step, total=steps, latents=latents, decode=decode_now,
                                               loss=loss, parts=parts))
                if keep_going is False:
                    result.stopped_at = step
                    break
    except KeyboardInterrupt:
        result.interrupted = True
        if last_whole is not None:      # Ctrl-C may land inside a step: go back to the last whole one
            with torch.no_grad():
                for t, saved in zip(tensors, last_whole.latents):
                    t.copy_(saved)
            del losses[last_whole.step:]
            result.steps_done = last_whole.step
            if keep_best and last_whole.best is not None:
                best, best_loss, best_step = last_whole.best, last_whole.best_loss, last_whole.best_step
    if checkpoint is not None and last_whole is not None and (result.interrupted or result.stopped_at is not None):
        checkpoint.save(last_whole)
    result.losses = torch.stack(losses).float().cpu().tolist() if losses else []
    if keep_best and best is not None:
        with torch.no_grad():
            for kept, t in zip(best, tensors):
                t.copy_(kept)
        result.best_step = best_step.cpu().tolist()
        result.best_loss = best_loss.float().cpu().tolist()
    result.latents = latents
    return result


__all__ = ["optimise", "clip_grad_norm_per_image", "OptimiseResult", "OptimiseSettings", "make_optimizer", "make_lr_schedule",
           "check_optimizer", "check_settings", "OPTIMIZERS", "OPTIMIZER_NAMES", "LR_SCHEDULES"]
