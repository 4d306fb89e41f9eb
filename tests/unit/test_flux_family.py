"""The Flux family (groundwork of #22) against diffusers' own FluxPipeline, on tiny Flux-shaped components."""

import torch
from diffusers import FluxPipeline

from attencraft_core.concept_tokens import ConceptTokens
from attencraft_core.concepts import parse_concepts
from attencraft_core.families import family_of, family_named
from attencraft_lab.tiny_flux import build_tiny_flux_pipeline, flux_components


def test_flux_components_are_recognised_with_their_towers_keys_and_size():
    comps = flux_components(build_tiny_flux_pipeline(seed=0))
    family = family_of(comps)
    assert comps.family == "flux" and family_named("flux") is family
    assert family.embedding_keys("flux") == ["clip_l", "t5xxl"] and comps.native_resolution == 64
    tokens = ConceptTokens.add(comps, parse_concepts("cat, dog"))
    assert tokens.widths == [32, 32] and tokens.rows().shape == (2, 64)
    t5_ids = comps.tokenizer_2("a photo of <c0>").input_ids
    assert tokens.ids[1][0] in t5_ids  # the placeholder is one T5 token
    word = comps.tokenizer_2("cat", add_special_tokens=False).input_ids
    torch.testing.assert_close(comps.text_encoder_2.get_input_embeddings().weight[tokens.ids[1][0]],
                               comps.text_encoder_2.get_input_embeddings().weight[word].mean(0))


def test_one_euler_step_from_pure_noise_is_the_pipelines():
    """Conditioning (T5 context, CLIP pooled, guidance), packing, positions and the timestep scale together:
    x0 = x1 - v(x1, 1) with our conditioning and denoiser call equals FluxPipeline's single step from x1."""
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    comps = flux_components(pipe)
    family = family_of(comps)
    prompt = "a photo of cat and dog"
    x1 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pipe(prompt, height=32, width=32, num_inference_steps=1, guidance_scale=3.5,
                      latents=FluxPipeline._pack_latents(x1, 1, 16, 16, 16), output_type="latent",
                      max_sequence_length=comps.tokenizer_2.model_max_length).images
        v = family.predict(comps, x1, torch.tensor([1.0]), family.conditioning(comps, [prompt], (32, 32)))
    torch.testing.assert_close(FluxPipeline._pack_latents(x1 - v, 1, 16, 16, 16), theirs, atol=1e-5, rtol=1e-4)


def test_the_training_sample_is_rectified_flow():
    comps = flux_components(build_tiny_flux_pipeline(seed=0))
    latents = torch.randn(4, 16, 16, 16)
    noisy, sigma, target = family_of(comps).training_sample(comps, latents, torch.Generator().manual_seed(0))
    assert sigma.shape == (4,) and bool(((sigma > 0) & (sigma < 1)).all())
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy - s * target, latents)  # noisy = (1 - s) x + s e, target = e - x
