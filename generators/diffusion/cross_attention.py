"""Cross-attention maps of a UNet's forward pass, for the guiders that steer them (Attend-and-Excite,
layout guidance).

``record_cross_attention(unet, res)`` swaps the processors of the UNet's cross-attention layers
(``attn2`` of each transformer block) for one that computes the attention probabilities explicitly and
keeps those of the layers whose map is ``res x res``; on leaving, the UNet's own processors come back,
so the sampling passes keep their fused attention. :meth:`CrossAttentionStore.maps` averages the kept
probabilities over heads and layers: ``[B, res, res, tokens]``, differentiable in the UNet's input.
"""

from __future__ import annotations

import contextlib

import torch


class CrossAttentionStore:
    """The cross-attention probabilities of the layers at one map resolution."""

    def __init__(self, res: int):
        self.res = int(res)
        self.probs: list[torch.Tensor] = []   # each [B * heads, res * res, tokens]
        self.heads: list[int] = []

    def keep(self, probs: torch.Tensor, heads: int) -> None:
        if probs.shape[1] == self.res * self.res:
            self.probs.append(probs)
            self.heads.append(heads)

    def clear(self) -> None:
        self.probs, self.heads = [], []

    def _heads(self) -> list[torch.Tensor]:
        """``[B, heads, res, res, tokens]`` per kept layer."""
        if not self.probs:
            raise ValueError(f"the UNet has no cross-attention layer with a {self.res}x{self.res} map; "
                             "pick another --attention-res")
        return [p.reshape(-1, h, self.res, self.res, p.shape[-1]) for p, h in zip(self.probs, self.heads)]

    def maps(self) -> torch.Tensor:
        """``[B, res, res, tokens]``: the mean over heads and layers of the kept probabilities."""
        return torch.cat(self._heads(), dim=1).mean(dim=1)

    def layer_maps(self) -> list[torch.Tensor]:
        """``[B, res, res, tokens]`` per kept layer: the mean over its heads."""
        return [m.mean(dim=1) for m in self._heads()]


class _RecordingProcessor:
    """Attention computed from its probabilities (diffusers' ``AttnProcessor`` arithmetic), which it hands
    to a :class:`CrossAttentionStore` on the way."""

    def __init__(self, store: CrossAttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        batch, length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        if encoder_hidden_states is not None:
            self.store.keep(probs, attn.heads)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def cross_attention_names(unet) -> list[str]:
    """The processor names of *unet*'s cross-attention layers (``...attn2.processor``)."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def cross_attention_resolutions(unet, latent_size: int) -> list[int]:
    """The side lengths of *unet*'s cross-attention maps for ``latent_size``-pixel latents."""
    sizes = set()
    for i, kind in enumerate(unet.config.down_block_types):
        if "CrossAttn" in kind:
            sizes.add(latent_size // 2 ** i)
    if "CrossAttn" in str(getattr(unet.config, "mid_block_type", "") or "UNetMidBlock2DCrossAttn"):
        sizes.add(latent_size // 2 ** (len(unet.config.down_block_types) - 1))
    return sorted(s for s in sizes if s > 0)


def default_attention_res(unet, latent_size: int) -> int:
    """The map resolution Attend-and-Excite and layout guidance read: 16 (their papers' choice for SD at 512
    pixels) where the UNet has it, else the one nearest to 16."""
    sizes = cross_attention_resolutions(unet, latent_size)
    if not sizes:
        raise ValueError("this denoiser has no UNet cross-attention layers; Attend-and-Excite and layout "
                         "guidance need a UNet model (SD 1.x/2.x, SDXL or the toy SD)")
    return min(sizes, key=lambda s: (abs(s - 16), -s))


@contextlib.contextmanager
def record_cross_attention(unet, res: int):
    """Inside: every forward of *unet* adds its ``res x res`` cross-attention probabilities to the yielded
    :class:`CrossAttentionStore` (cleared by the caller between passes)."""
    store = CrossAttentionStore(res)
    original = unet.attn_processors
    recording = _RecordingProcessor(store)
    unet.set_attn_processor({name: recording if name in set(cross_attention_names(unet)) else proc
                             for name, proc in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
