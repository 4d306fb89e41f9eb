"""The ComfyUI -> diffusers bridge for Flux.1 against a real ComfyUI, in-process, on the files ComfyUI users load
Flux from (Load Diffusion Model, DualCLIPLoader type flux, Load VAE): a depth-one Flux transformer ComfyUI detects
as Flux, full-size CLIP-L and T5-XXL (fp8), Flux's VAE, all random (comfy_support.build_flux_files). Skipped
without COMFYUI_DIR. About 18 GB of memory at its peak."""

import pytest
import torch

from comfy_support import add_comfy_to_path, build_flux_files, comfy_dir, load_pack

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(comfy_dir() is None, reason="COMFYUI_DIR is not set (ComfyUI is not on PyPI)")]

PROMPT = "a photo of a cat and a dog"


@pytest.fixture(scope="module")
def flux_objects():
    add_comfy_to_path()
    import comfy.sd
    import comfy.utils

    paths = build_flux_files()
    model = comfy.sd.load_diffusion_model(str(paths["unet"]))
    clip = comfy.sd.load_clip([str(paths["clip_l"]), str(paths["t5xxl"])], clip_type=comfy.sd.CLIPType.FLUX)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(paths["vae"])))
    return model, clip, vae


@pytest.fixture(scope="module")
def comps(flux_objects):
    load_pack()
    from attencraft_pack.nodes.bridge import components_from_comfy

    with torch.inference_mode():  # as ComfyUI runs every prompt
        with torch.inference_mode(False):
            return components_from_comfy(*flux_objects)


def test_comfyui_loads_the_files_as_flux_dev_with_an_fp8_t5(flux_objects, comps):
    model, clip, _ = flux_objects
    assert type(model.model.model_config).__name__ == "Flux" and model.model.model_config.unet_config["guidance_embed"]
    assert clip.get_sd()["t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float8_e4m3fn
    assert comps.family == "flux" and comps.dtype == torch.float32  # the CPU computes in fp32
    t5 = comps.text_encoder_2
    assert type(t5.encoder.block[0].layer[0].SelfAttention.q).__name__ == "FrozenFloat8Linear"
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn  # never widened
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # transformers keeps wo wide


def test_the_transformer_computes_what_comfyui_computes(flux_objects, comps):
    from attencraft_pack.attencraft_core.families import family_of

    model = flux_objects[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=generator)
    ctx, pooled = torch.randn(1, 12, 4096, generator=generator), torch.randn(1, 768, generator=generator)
    sigma, guidance = torch.tensor([0.6]), torch.tensor([3.5])
    with torch.no_grad():
        theirs = model.model.diffusion_model(x, sigma, ctx, y=pooled, guidance=guidance)
        ours = family_of(comps).predict(comps, x, sigma, {"encoder_hidden_states": ctx, "pooled_projections": pooled,
                                                          "guidance": guidance})
    assert (ours - theirs).abs().max() < 1e-4 * max(1.0, float(theirs.abs().max()))


def test_the_conditioning_is_comfyuis_clip_text_encode(flux_objects, comps):
    """T5-XXL context (padded to 256 tokens) and CLIP-L pooled output, as CLIP Text Encode gives them."""
    from attencraft_pack.attencraft_core.families import family_of

    clip = flux_objects[1]
    with torch.no_grad():
        context, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
        ours = family_of(comps).conditioning(comps, [PROMPT], (512, 512))
    assert context.shape == ours["encoder_hidden_states"].shape == (1, 256, 4096)
    scale = float(context.abs().max())
    assert (ours["encoder_hidden_states"] - context.float()).abs().max() < 1e-4 * scale
    torch.testing.assert_close(ours["pooled_projections"], pooled.float(), atol=1e-4, rtol=1e-4)


def test_the_vae_decodes_what_comfyui_decodes(flux_objects, comps):
    from attencraft_pack.attencraft_core.encoding import decode_latents

    vae, model = flux_objects[2], flux_objects[0]
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = vae.decode(model.model.latent_format.process_out(latents))  # [B, H, W, 3] in [0, 1]
        ours = (decode_latents(comps, latents).permute(0, 2, 3, 1) + 1) / 2
    torch.testing.assert_close(ours, theirs.float(), atol=2e-3, rtol=1e-3)


def test_flux_trains_under_inference_mode_and_comfyui_loads_its_lora_and_embeddings(flux_objects, comps, tmp_path):
    """A training step through the fp8 T5 (the T5 row learns), then the LoRA on ComfyUI's MODEL with every key
    and the embedding (clip_l + t5xxl) in ComfyUI's own Flux tokenizers."""
    import comfy.lora
    import comfy.sd
    from PIL import Image

    from attencraft_pack.attencraft_core.concepts import parse_concepts
    from attencraft_pack.attencraft_core.training import Trainer, TrainOptions
    from attencraft_pack.nodes.logic import check_lora_keys, fill_prompt, write_embeddings

    model, clip, _ = flux_objects
    masks = [torch.zeros(128, 128), torch.zeros(128, 128)]
    masks[0][:64], masks[1][64:] = 1, 1
    image = Image.new("RGB", (128, 128), (120, 60, 30))
    with torch.inference_mode():
        with torch.inference_mode(False):
            opts = TrainOptions(steps=1, rank=2, resolution=128, prior_weight=0)
            trainer = Trainer(comps, image, parse_concepts("cat, dog"), tmp_path / "run", opts, user_masks=masks,
                              log=lambda s: None)
            before = trainer.tokens.rows().clone()
            result = trainer.run("fx")
    cs = result.concept_set
    assert cs.family == "flux" and cs.widths == [768, 4096]
    assert bool(((cs.embeddings - before)[:, 768:].abs().amax(1) > 0).all())  # learned through the fp8 T5
    lora = cs.comfy_lora()
    check_lora_keys(lora, comfy.lora.model_lora_keys_unet(model.model, {}))
    patched, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    assert len(patched.patches) == 2  # to_k/to_v and add_k/add_v land in the fused img/txt qkv weights
    names = write_embeddings(cs, "fx", tmp_path / "embeddings")
    prompt = fill_prompt("a photo of <c0>", cs, names)
    tokens = type(clip.tokenizer)(embedding_directory=str(tmp_path / "embeddings")).tokenize_with_weights(prompt)
    for tower, row in (("l", cs.embeddings[0][:768]), ("t5xxl", cs.embeddings[0][768:])):
        found = [t for t, _, *_ in tokens[tower][0] if isinstance(t, torch.Tensor)]
        assert len(found) == 1, f"{tower} did not load the embedding"
        torch.testing.assert_close(found[0].float().flatten(), row)
