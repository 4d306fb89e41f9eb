"""Recording Flux's joint attention (groundwork of the Flux family): the same output, the maps the method reads."""

import torch

from attencraft_core.attention import AttentionStore
from attencraft_core.joint_attention import double_stream_processors, record_joint_attention
from attencraft_lab.tiny_flux import build_tiny_flux_pipeline


def transformer_inputs(transformer, n_text=7, side=4):
    """Packed image tokens (side x side), text states, ids and conditioning for one image."""
    config = transformer.config
    image_ids = torch.zeros(side, side, 3)
    image_ids[..., 1], image_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    return dict(hidden_states=torch.randn(1, side * side, config.in_channels),
                encoder_hidden_states=torch.randn(1, n_text, config.joint_attention_dim),
                pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), txt_ids=torch.zeros(n_text, 3), img_ids=image_ids.reshape(-1, 3))


def test_recording_changes_nothing_and_keeps_each_image_tokens_text_and_image_attention():
    transformer = build_tiny_flux_pipeline(seed=0).transformer
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        plain = transformer(**inputs).sample
        store = AttentionStore(rows=[0])
        with record_joint_attention(transformer, store):
            recorded = transformer(**inputs).sample
        again = transformer(**inputs).sample  # the stock processors are back
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-4)
    assert torch.equal(again, plain)
    assert len(double_stream_processors(transformer)) == transformer.config.num_layers == store.counts["cross"]
    cross, self_attn = store.mean("cross")[0], store.mean("self")[0]
    assert cross.shape == (16, 7) and self_attn.shape == (16, 16)  # image queries x text / image keys
    torch.testing.assert_close(cross.sum(-1), torch.ones(16))
    torch.testing.assert_close(self_attn.sum(-1), torch.ones(16))
