"""Recording a diffusion transformer's joint attention (Flux's double-stream blocks), the maps the method reads.

In a joint-attention block, text and image tokens attend over one sequence [text; image]. For each image token
(query) the recorder keeps its attention over the text tokens ("cross", renormalised over the text keys, so
that it is a distribution as a UNet's cross-attention is) and over the image tokens ("self", renormalised over
the image keys), head-averaged, in an `AttentionStore`. Layers not recorded keep diffusers' own processor.
Groundwork of the Flux family (issue #22): not yet used by masks or training.
"""

from __future__ import annotations

import contextlib

import torch

from .attention import AttentionStore


class JointAttentionRecorder:
    """Flux attention (the computation of diffusers' FluxAttnProcessor) with explicit probabilities, recorded
    into `store` for the image queries. Blocks without separate text states (single-stream) are refused: their
    text length is not known to the processor."""

    def __init__(self, store: AttentionStore):
        self.store = store

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
        # [B, S, H, D] -> probabilities [B, H, S, S] over the joint sequence
        scores = torch.einsum("bshd,bthd->bhst", query, key) * attn.head_dim ** -0.5
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        out = torch.einsum("bhst,bthd->bshd", probs, value).flatten(2, 3).to(query.dtype)
        n_text, heads = encoder_hidden_states.shape[1], probs.shape[1]
        image_rows = probs[:, :, n_text:].float()
        for kind, part in (("cross", image_rows[..., :n_text]), ("self", image_rows[..., n_text:])):
            part = part / part.sum(-1, keepdim=True).clamp_min(1e-12)
            self.store.add(kind, part.flatten(0, 1), heads)
        text_out, image_out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def double_stream_processors(transformer) -> list[str]:
    """Processor names of the transformer's double-stream (joint text-image) blocks, in order."""
    return [name for name in transformer.attn_processors if name.startswith("transformer_blocks.")]


@contextlib.contextmanager
def record_joint_attention(transformer, store: AttentionStore, blocks: list[int] | None = None):
    """Record the chosen double-stream blocks (all when None) into `store`; restore the processors on exit."""
    names = double_stream_processors(transformer)
    chosen = set(names if blocks is None else [names[i] for i in blocks])
    previous = transformer.attn_processors
    transformer.set_attn_processor({name: JointAttentionRecorder(store) if name in chosen else processor
                                    for name, processor in previous.items()})
    try:
        yield store
    finally:
        transformer.set_attn_processor(previous)
