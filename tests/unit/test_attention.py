"""Attention capture: exact probabilities, gradients, layer choice, fused attention elsewhere."""

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from attencraft_core import AttenCraftError
from attencraft_core.attention import (AttenCraftAttnProcessor, AttentionStore, capture_attention,
                                       layer_factors, select_layers)


def manual_probs(attn, x, ctx):
    q, k = attn.to_q(x), attn.to_k(ctx)
    b, n, _ = q.shape
    d = q.shape[-1] // attn.heads
    q = q.view(b, n, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=1)  # [b, n, m]


@pytest.mark.parametrize("cross", [True, False])
def test_recorded_probabilities_equal_a_direct_softmax(cross):
    attn = Attention(query_dim=16, cross_attention_dim=12 if cross else None, heads=4, dim_head=4)
    x = torch.randn(2, 20, 16)
    ctx = torch.randn(2, 7, 12) if cross else None
    store = AttentionStore(rows=[1])
    attn.set_processor(AttenCraftAttnProcessor(store, "cross"))
    out = attn(x, encoder_hidden_states=ctx)
    expected = manual_probs(attn, x, ctx if cross else x)[1:]
    torch.testing.assert_close(store.mean("cross"), expected, atol=1e-6, rtol=1e-5)
    attn.set_processor(AttnProcessor2_0())
    torch.testing.assert_close(out, attn(x, encoder_hidden_states=ctx), atol=1e-5, rtol=1e-5)


def test_recorded_probabilities_carry_gradients():
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    store = AttentionStore()
    attn.set_processor(AttenCraftAttnProcessor(store, "cross"))
    ctx = torch.randn(1, 5, 12, requires_grad=True)
    attn(torch.randn(1, 9, 16), encoder_hidden_states=ctx)
    store.mean("cross")[0, :, 2].sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert attn.to_k.weight.grad is not None and attn.to_k.weight.grad.abs().sum() > 0


def test_detached_start_token_gets_no_key_value_gradient():
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    attn.set_processor(AttenCraftAttnProcessor(detach_sot=True))
    ctx = torch.randn(1, 5, 12, requires_grad=True)
    attn(torch.randn(1, 9, 16), encoder_hidden_states=ctx).sum().backward()
    assert ctx.grad[0, 0].abs().sum() == 0 and ctx.grad[0, 1:].abs().sum() > 0


@pytest.mark.parametrize("latent", [64, 32, 96])
def test_selected_layers_run_at_latent_over_4_and_over_2(tiny, latent):
    unet = tiny.denoiser
    seen = {}

    def hook(name):
        def record(module, args, kwargs):
            seen[name] = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
        return record

    modules = dict(unet.named_modules())
    handles = [modules[n.removesuffix(".processor")].register_forward_pre_hook(hook(n), with_kwargs=True)
               for n in unet.attn_processors]
    with torch.no_grad():
        unet(torch.randn(1, 4, latent, latent), 10, torch.randn(1, 77, 32))
    for h in handles:
        h.remove()
    cross, self_ = select_layers(unet, "cross", 4), select_layers(unet, "self", 2)
    assert cross and self_
    assert all(n.endswith("attn2.processor") and seen[n] == (latent // 4) ** 2 for n in cross)
    assert all(n.endswith("attn1.processor") and seen[n] == (latent // 2) ** 2 for n in self_)
    # every layer at those sizes was chosen: nothing is missed
    assert {n for n in seen if n.endswith("attn2.processor") and seen[n] == (latent // 4) ** 2} == set(cross)
    assert {n for n in seen if n.endswith("attn1.processor") and seen[n] == (latent // 2) ** 2} == set(self_)


def test_capture_records_only_asked_layers_and_restores_processors(tiny):
    unet = tiny.denoiser
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    lat, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        reference = unet(lat, 10, ctx).sample
        store = AttentionStore()
        with capture_attention(unet, store, cross_factor=4, self_factor=2):
            captured = unet(lat, 10, ctx).sample
            procs = unet.attn_processors
    recording = [n for n, p in procs.items() if p.kind is not None]
    assert sorted(recording) == sorted(select_layers(unet, "cross", 4) + select_layers(unet, "self", 2))
    assert store.counts == {"cross": len(select_layers(unet, "cross", 4)), "self": len(select_layers(unet, "self", 2))}
    assert store.mean("cross").shape == (1, 8 * 8, 77)
    assert store.mean("self").shape == (1, 16 * 16, 16 * 16)
    torch.testing.assert_close(store.mean("self").sum(-1), torch.ones(1, 256))
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-4)
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before


def test_missing_factor_is_a_clear_error(tiny):
    with pytest.raises(AttenCraftError, match="no cross-attention layers at latent/16.*latent/1, latent/2"):
        select_layers(tiny.denoiser, "cross", 16)
    assert set(layer_factors(tiny.denoiser).values()) == {1, 2, 4, 8}
