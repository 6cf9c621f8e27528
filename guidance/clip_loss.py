"""``CLIPLoss``: rendered images in, one differentiable loss out.

images ``[B,3,H,W]`` in ``[0,1]`` -> cutouts per encoder input size -> CLIP image
embeddings -> distance to each prompt's cached target embedding -> weighted sum, plus
optional auxiliary image losses. Knows nothing about what produced the images.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .cutouts import Cutouts
from .encoders import Encoder
from .losses import DISTANCES, IMAGE_LOSSES, clamp_with_grad
from .images import load_image
from .objective import LossOutput, Objective, check_image_values, check_images
from .prompts import Prompt, PromptSchedule, PromptSpec


class CLIPLoss(Objective):
    """Weighted CLIP distance between images and prompts, over one or more encoders.

    Args:
        encoders: one :class:`~guidance.encoders.Encoder` or several (an ensemble).
        prompts: ``"a red fox:1.5|blurry:-1"``, a list of prompts, or a :class:`PromptSchedule`.
        cutouts: the :class:`Cutouts` used for every encoder (default: 32 cuts, default augs).
        encoder_weights: one weight per encoder (default 1 each).
        distance: ``"spherical"`` (default) or ``"cosine"``.
        image_losses: auxiliary losses ``{"tv": w, "range": w, "saturation": w, "symmetry": w}``.
        seed: seeds the internal generator used when ``forward`` gets none.
    """

    def __init__(self, encoders: Encoder | Sequence[Encoder], prompts: PromptSpec | PromptSchedule, *,
                 cutouts: Cutouts | None = None, encoder_weights: Sequence[float] | None = None,
                 distance: str = "spherical", image_losses: Mapping[str, float] | None = None,
                 seed: int = 0):
        super().__init__()
        encoders = [encoders] if isinstance(encoders, Encoder) else list(encoders)
        if not encoders:
            raise ValueError("CLIPLoss needs at least one encoder")
        self.encoders = nn.ModuleList(encoders)
        weights = [1.0] * len(encoders) if encoder_weights is None else [float(w) for w in encoder_weights]
        if len(weights) != len(encoders):
            raise ValueError(f"{len(weights)} encoder weights for {len(encoders)} encoders; give one per encoder")
        self.encoder_weights = weights
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose from {', '.join(DISTANCES)}")
        self.distance = DISTANCES[distance]
        self.image_losses = dict(image_losses or {})
        for name in self.image_losses:
            if name not in IMAGE_LOSSES:
                raise ValueError(f"unknown image loss {name!r}; choose from {', '.join(IMAGE_LOSSES)}")
        self.cutouts = cutouts if cutouts is not None else Cutouts()
        self.generator = torch.Generator().manual_seed(seed)
        self._cache: dict[tuple[int, Prompt], torch.Tensor] = {}
        self._prompt_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._values_checked = False
        self.set_prompts(prompts)

    # -- prompts -----------------------------------------------------------------
    def set_prompts(self, prompts: PromptSpec | PromptSchedule) -> None:
        """Replace the prompts (or schedule); embeddings already computed stay cached."""
        self.schedule = prompts if isinstance(prompts, PromptSchedule) else PromptSchedule(prompts)
        self._encode(self.schedule.all_prompts())

    def _encode(self, prompts: Sequence[Prompt]) -> None:
        for idx, enc in enumerate(self.encoders):
            texts = [p for p in prompts if p.kind == "text" and (idx, p) not in self._cache]
            if texts:
                emb = enc.encode_text([p.value for p in texts])
                for p, e in zip(texts, emb):
                    self._cache[(idx, p)] = e
            for p in prompts:
                if (idx, p) in self._cache:
                    continue
                if p.kind == "image":
                    with torch.no_grad():
                        image = load_image(p.value).to(enc.device)
                        self._cache[(idx, p)] = enc.encode_image(image)[0]
                elif p.kind == "noise":
                    g = torch.Generator().manual_seed(int(p.value))
                    self._cache[(idx, p)] = torch.randn(enc.embed_dim, generator=g).to(enc.device)

    def targets(self, step: int = 0) -> tuple[list[Prompt], list[torch.Tensor]]:
        """The prompts active at *step* and, per encoder, their embeddings ``[P, D]``."""
        prompts = self.schedule.at(step)
        missing = [p for p in prompts if (0, p) not in self._cache]
        if missing:
            self._encode(missing)
        return prompts, [torch.stack([self._cache[(i, p)] for p in prompts]) for i in range(len(self.encoders))]

    def _prompt_tensors(self, prompts: Sequence[Prompt], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and stops of *prompts* on *device*, built once per prompt set (no copy per step)."""
        key = (tuple(prompts), str(device))
        if key not in self._prompt_cache:
            self._prompt_cache[key] = (torch.tensor([p.weight for p in prompts], device=device),
                                       torch.tensor([p.stop for p in prompts], device=device))
        return self._prompt_cache[key]

    # -- loss --------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *, step: int = 0,
                generator: torch.Generator | None = None) -> LossOutput:
        check_images(images)
        if not self._values_checked:       # once (a host sync): NaN, inf or 0..255 images fail here, clearly
            check_image_values(images.detach(), strict=False)
            self._values_checked = True
        raw = images                       # the range loss measures what the renderer overshot
        images = clamp_with_grad(images)
        generator = self.generator if generator is None else generator
        prompts, targets = self.targets(step)
        batch = images.shape[0]
        weights, stops = self._prompt_tensors(prompts, images.device)
        sign = torch.sign(weights)
        prompt_terms = images.new_zeros(batch, len(prompts), dtype=torch.float32)
        cuts_by_size: dict[int, torch.Tensor] = {}
        for enc, enc_weight, target in zip(self.encoders, self.encoder_weights, targets):
            size = enc.input_size
            if size not in cuts_by_size:
                cuts_by_size[size] = self.cutouts(images, size, generator=generator)
            emb = enc.encode_image(cuts_by_size[size])                        # [N*B, D]
            emb = emb.view(-1, batch, 1, emb.shape[-1])                         # [N, B, 1, D]
            dist = self.distance(emb, target.to(emb.device)[None, None]).mean(0)  # [B, P]
            signed = dist * sign
            # Below its stop threshold a prompt keeps its value but stops pulling.
            signed = torch.where(signed >= stops, signed, signed.detach())
            prompt_terms = prompt_terms + enc_weight * weights.abs() * signed
        parts = {p.label: prompt_terms[:, j].detach() for j, p in enumerate(prompts)}
        per_image = prompt_terms.sum(1)
        for name, weight in self.image_losses.items():
            if weight:
                value = IMAGE_LOSSES[name]((raw if name == "range" else images).float()) * weight
                parts[name] = value.detach()
                per_image = per_image + value
        return LossOutput(total=per_image.sum(), per_image=per_image, parts=parts)

    def conditioning_text(self, step: int = 0) -> str:
        """The positive-weight text prompts active at *step*, joined with ", " (for text-conditioned generators)."""
        return self.schedule.positive_text(step)

    def extra_repr(self) -> str:
        names = ", ".join(e.name for e in self.encoders)
        return f"encoders=[{names}], prompts={[p.label for p in self.schedule.all_prompts()]}"
