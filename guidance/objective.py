"""The objective contract: anything that scores rendered images and can steer a generator.

An :class:`Objective` takes images ``[B, 3, H, W]`` in ``[0, 1]`` and returns a
:class:`LossOutput` (lower is better): ``total`` (the sum over the batch, what a backward pass
starts from), ``per_image`` (``[B]``) and named ``parts`` (each ``[B]``, detached, for logs).
Generators see only this contract: ``objective(images, step=, generator=)``,
``objective.conditioning_text(step)`` for those that condition on a text prompt, and
``objective.device`` / ``objective.dtype``. ``CLIPLoss`` is one; a reward model is another;
:class:`WeightedObjectives` (a weighted sum of objectives) is itself one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn


@dataclass
class LossOutput:
    """``total`` is the sum over images of ``per_image``; ``parts`` name each term, per image."""

    total: torch.Tensor
    per_image: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def items(self) -> dict[str, float]:
        """Parts averaged over the batch as floats, for logs (a host sync: call sparingly)."""
        return {k: float(v.mean()) for k, v in self.parts.items()}


def check_images(images, what: str = "images") -> torch.Tensor:
    """The one check of images at a public boundary: a float tensor ``[B, 3, H, W]``, B >= 1.

    Values are not range-checked here (that would sync the host every step); use
    :func:`check_image_values` where a sync is affordable (scoring, not steering).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [B, 3, H, W] in [0, 1]; got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch; give at least one image")
    if not images.is_floating_point():
        raise ValueError(f"{what} are {str(images.dtype).replace('torch.', '')}; convert to float in [0, 1] "
                         "(e.g. images.float() / 255)")
    return images


def check_image_values(images: torch.Tensor, what: str = "images", *, strict: bool = True) -> torch.Tensor:
    """:func:`check_images`, plus finite values (a host sync). ``strict``: within ``[0, 1]``; otherwise
    (rendered images, which may overshoot while steering) only images that look like 0..255 are refused."""
    check_images(images, what)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} contain NaN or infinite values; give finite values in [0, 1]")
    low, high = float(images.min()), float(images.max())
    eight_bit = low >= 0 and high > 2
    if eight_bit or (strict and (low < -1e-3 or high > 1 + 1e-3)):
        hint = " (they look like 0..255: divide by 255)" if eight_bit else ""
        raise ValueError(f"{what} must be in [0, 1]; got values from {low:.3g} to {high:.3g}{hint}")
    return images


class Objective(nn.Module):
    """Base class of everything that scores images for steering (lower loss is better).

    Subclasses implement ``forward(images, *, step=0, generator=None) -> LossOutput`` and may
    override :meth:`conditioning_text`. ``device`` and ``dtype`` come from the first parameter or
    buffer (CPU / float32 for an objective without any). Renderers may overshoot ``[0, 1]`` a little;
    an objective clamps what it needs (``guidance.clamp_with_grad``). ``steers`` is False for an
    objective that only carries conditioning text (:class:`ConditioningOnly`).
    """

    steers: bool = True

    def forward(self, images: torch.Tensor, *, step: int = 0,
                generator: torch.Generator | None = None) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def conditioning_text(self, step: int = 0) -> str:
        """Text a text-conditioned generator should be conditioned on at *step* ("" when none)."""
        return ""

    def _first_tensor(self) -> torch.Tensor | None:
        for tensor in self.parameters():
            return tensor
        for tensor in self.buffers():
            return tensor
        return None

    @property
    def device(self) -> torch.device:
        tensor = self._first_tensor()
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        tensor = self._first_tensor()
        return tensor.dtype if tensor is not None else torch.float32

    def __add__(self, other: "Objective") -> "WeightedObjectives":
        return WeightedObjectives([(self, 1.0), (other, 1.0)])

    def __mul__(self, weight: float) -> "WeightedObjectives":
        return WeightedObjectives([(self, float(weight))])

    __rmul__ = __mul__


class ConditioningOnly(Objective):
    """No loss at all, only the text a text-conditioned generator is conditioned on: the objective of a
    run without guidance (``--clip none``), so Stable Diffusion still draws the prompt."""

    steers = False

    def __init__(self, schedule):
        super().__init__()
        from .prompts import PromptSchedule

        self.schedule = schedule if isinstance(schedule, PromptSchedule) else PromptSchedule(schedule)

    def forward(self, images: torch.Tensor, *, step: int = 0, generator: torch.Generator | None = None) -> LossOutput:
        check_images(images)
        per_image = images.new_zeros(images.shape[0], dtype=torch.float32)
        return LossOutput(total=per_image.sum(), per_image=per_image)

    def conditioning_text(self, step: int = 0) -> str:
        return self.schedule.positive_text(step)


class WeightedObjectives(Objective):
    """``sum_k w_k * objective_k(images)``: itself an objective.

    Parts are the weighted parts of each member, prefixed ``"<name>/"`` (names default to the
    member's class name, made unique with a number); ``conditioning_text`` is the first member's
    non-empty one. Weights must be finite; a weight of 0 keeps the member's parts in the logs
    without steering. Parts a member lists in ``raw_parts`` (a reward's ``score``) are logged as
    they are, unweighted, so a reward's own score can be read off every step.
    """

    def __init__(self, members: Iterable[tuple[Objective, float]] | Sequence[Objective], *,
                 names: Sequence[str] | None = None):
        super().__init__()
        pairs = [(m, 1.0) if isinstance(m, Objective) else tuple(m) for m in members]
        if not pairs:
            raise ValueError("WeightedObjectives needs at least one objective")
        flat: list[tuple[Objective, float]] = []
        for member, weight in pairs:
            if not isinstance(member, Objective):
                raise TypeError(f"{type(member).__name__} is not a guidance.Objective")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"objective weight {weight!r} is not a number") from None
            if not math.isfinite(weight):
                raise ValueError(f"objective weight {weight} is not finite; give a finite number")
            if isinstance(member, WeightedObjectives) and names is None:   # flatten nested sums
                flat += [(m, weight * w) for m, w in zip(member.members, member.weights)]
            else:
                flat.append((member, weight))
        self.members = nn.ModuleList([m for m, _ in flat])
        self.weights = [w for _, w in flat]
        if names is not None and len(names) != len(flat):
            raise ValueError(f"{len(names)} names for {len(flat)} objectives; give one per objective")
        self.names = list(names) if names is not None else self._default_names()

    def _default_names(self) -> list[str]:
        names, seen = [], {}
        for member in self.members:
            base = getattr(member, "objective_name", None) or type(member).__name__
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}{seen[base]}")
        return names

    def forward(self, images: torch.Tensor, *, step: int = 0,
                generator: torch.Generator | None = None) -> LossOutput:
        check_images(images)
        per_image = images.new_zeros(images.shape[0], dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for name, member, weight in zip(self.names, self.members, self.weights):
            out = member(images, step=step, generator=generator)
            per_image = per_image + weight * out.per_image.float()
            parts[name] = (weight * out.per_image).detach()
            raw = getattr(member, "raw_parts", ())
            for key, value in out.parts.items():
                parts[f"{name}/{key}"] = value.detach() if key in raw else (weight * value).detach()
        return LossOutput(total=per_image.sum(), per_image=per_image, parts=parts)

    def conditioning_text(self, step: int = 0) -> str:
        for member in self.members:
            text = member.conditioning_text(step)
            if text:
                return text
        return ""


__all__ = ["LossOutput", "Objective", "WeightedObjectives", "ConditioningOnly", "check_images", "check_image_values"]
