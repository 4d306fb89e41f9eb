"""Attention capture: processors that record softmax attention maps for chosen UNet layers only.

Every other layer keeps fused scaled-dot-product attention. Recorded maps are the probabilities of the
chosen batch rows, averaged over heads and over layers, and they carry gradients.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import AttenCraftError


def layer_factors(unet) -> dict[str, int]:
    """Downsampling factor (latent side / layer side) of every attention processor name in the UNet."""
    n = len(unet.config.block_out_channels)
    factors = {}
    for name in unet.attn_processors:
        part, _, rest = name.partition(".")
        if part == "mid_block":
            factors[name] = 2 ** (n - 1)
        else:
            index = int(rest.split(".")[0])
            factors[name] = 2 ** index if part == "down_blocks" else 2 ** (n - 1 - index)
    return factors


def select_layers(unet, kind: str, factor: int) -> list[str]:
    """Processor names of the self ("self") or cross ("cross") attention layers at latent/factor."""
    suffix = {"self": ".attn1.processor", "cross": ".attn2.processor"}[kind]
    names = [n for n, f in layer_factors(unet).items() if f == factor and n.endswith(suffix)]
    if not names:
        available = sorted({f for n, f in layer_factors(unet).items() if n.endswith(suffix)})
        raise AttenCraftError(
            f"This UNet has no {kind}-attention layers at latent/{factor}; it has them at latent/"
            f"{', latent/'.join(map(str, available))}. Choose one of those factors.")
    return names


@dataclass
class AttentionStore:
    """Sum of head-averaged attention maps per kind over the recorded layers, for chosen batch rows."""

    rows: list[int] = field(default_factory=lambda: [0])
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, probs: torch.Tensor, heads: int) -> None:
        """`probs` is [batch*heads, queries, keys] as diffusers lays it out."""
        maps = probs.unflatten(0, (-1, heads))[self.rows].mean(dim=1).float()
        self.sums[kind] = maps if kind not in self.sums else self.sums[kind] + maps
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def mean(self, kind: str) -> torch.Tensor:
        """[rows, queries, keys]: averaged over the layers recorded since the last reset."""
        if kind not in self.sums:
            raise AttenCraftError(f"No {kind}-attention was recorded: the UNet never ran the selected layers.")
        return self.sums[kind] / self.counts[kind]

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


class AttenCraftAttnProcessor:
    """Attention that records probabilities into `store` when `kind` is set, else runs fused SDPA.

    With `detach_sot`, the start-of-text token's key and value carry no gradient in cross-attention
    (Custom Diffusion / AttenCraft training).
    """

    def __init__(self, store: AttentionStore | None = None, kind: str | None = None, detach_sot: bool = False):
        self.store, self.kind, self.detach_sot = store, kind, detach_sot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        if is_cross and self.detach_sot:
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)
        if self.kind is None:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            q, k, v = (t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
                       for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
            hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1]).to(query.dtype)
        else:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            q, k, v = (attn.head_to_batch_dim(t) for t in (query, key, value))
            probs = attn.get_attention_scores(q, k, attention_mask)
            self.store.add(self.kind, probs, attn.heads)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, v))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def capture_attention(unet, store: AttentionStore, cross_factor: int | tuple[int, ...] | None = 4,
                      self_factor: int | tuple[int, ...] | None = 2, detach_sot: bool = False):
    """Install recording processors on the layers at the chosen factor(s) (None skips a kind), restore the old
    ones on exit."""
    chosen = {}
    for kind, factors in (("cross", cross_factor), ("self", self_factor)):
        for factor in (factors,) if isinstance(factors, int) else factors or ():
            chosen.update(dict.fromkeys(select_layers(unet, kind, factor), kind))
    previous = unet.attn_processors
    unet.set_attn_processor({name: AttenCraftAttnProcessor(store, chosen.get(name), detach_sot)
                             for name in previous})
    try:
        yield store
    finally:
        unet.set_attn_processor(previous)


def map_side(num_queries: int, aspect: float = 1.0) -> tuple[int, int]:
    """(height, width) of a flattened map with `num_queries` pixels and the given width/height ratio."""
    height = int(round(math.sqrt(num_queries / aspect)))
    width = num_queries // height
    if height * width != num_queries:
        raise AttenCraftError(f"Cannot lay {num_queries} attention queries out as an image of aspect {aspect}.")
    return height, width
