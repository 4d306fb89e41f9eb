"""Recording a diffusion transformer's joint attention (Flux's double-stream blocks), the maps the method reads.

In a joint-attention block, text and image tokens attend over one sequence [text; image]. For each image token
(query) the recorder keeps its attention over the text tokens ("cross") and over the image tokens ("self"), each
renormalised over those keys, so that each is a distribution as a UNet's cross- and self-attention are, averaged
over heads, in an `AttentionStore`. A renormalised part of a softmax is the softmax of that part's scores, so
the maps come from image-query x text-key (and image-key) scores only: the block's output itself is fused
scaled-dot-product attention, and training never holds a full joint probability matrix. Blocks not recorded keep
diffusers' own processor.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .attention import AttentionStore

HEADS_AT_ONCE = 4


class JointAttentionRecorder:
    """Flux attention (the computation of diffusers' FluxAttnProcessor) that also records, for the image queries,
    the attention `kinds` ("cross": over the text keys, "self": over the image keys) into `store`. Blocks without
    separate text states (single-stream) are refused: their text length is not known to the processor."""

    def __init__(self, store: AttentionStore, kinds: tuple[str, ...] = ("cross", "self")):
        self.store, self.kinds = store, kinds

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb  # on use (see lora.py)
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if encoder_hidden_states is None or attention_mask is not None:
            raise NotImplementedError("joint-attention recording reads double-stream blocks without masks only")
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_query, text_key, text_value = (t.unflatten(-1, (-1, attn.head_dim))
                                            for t in (text_query, text_key, text_value))
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query = torch.cat([text_query, query], dim=1)
        key = torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2, 3).to(query.dtype)
        n_text, heads = encoder_hidden_states.shape[1], q.shape[1]
        image_queries = q[:, :, n_text:]
        for kind in self.kinds:
            keys = k[:, :, :n_text] if kind == "cross" else k[:, :, n_text:]
            # the head average, a few heads at a time: one [queries, keys] map per head at most (at 1024 px,
            # 64 MB in float32 where all 24 heads' image-to-image maps at once would be 1.6 GB)
            mean = sum((image_queries[:, h:h + HEADS_AT_ONCE] @ keys[:, h:h + HEADS_AT_ONCE].transpose(-1, -2)).float()
                       .mul(attn.head_dim ** -0.5).softmax(dim=-1).sum(dim=1)
                       for h in range(0, heads, HEADS_AT_ONCE)) / heads
            self.store.add(kind, mean, 1)
        text_out, image_out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def double_stream_processors(transformer) -> list[str]:
    """Processor names of the transformer's double-stream (joint text-image) blocks, in order."""
    return [name for name in transformer.attn_processors if name.startswith("transformer_blocks.")]


@contextlib.contextmanager
def record_joint_attention(transformer, store: AttentionStore, blocks: list[int] | None = None,
                           kinds: tuple[str, ...] = ("cross", "self")):
    """Record `kinds` in the chosen double-stream blocks (all when None; negative indices count from the last)
    into `store`; restore the processors on exit."""
    names = double_stream_processors(transformer)
    chosen = set(names if blocks is None else [names[i] for i in blocks])
    previous = transformer.attn_processors
    transformer.set_attn_processor({name: JointAttentionRecorder(store, kinds) if name in chosen else processor
                                    for name, processor in previous.items()})
    try:
        yield store
    finally:
        transformer.set_attn_processor(previous)
