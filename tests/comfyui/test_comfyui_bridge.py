"""The ComfyUI -> diffusers bridge against a real ComfyUI, in-process (skipped without COMFYUI_DIR)."""

import pytest
import torch

from comfy_support import (SDXL_LAYOUT, add_comfy_to_path, build_sd15_checkpoint, build_sdxl_checkpoint,
                          comfy_dir, load_pack)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(comfy_dir() is None, reason="COMFYUI_DIR is not set (ComfyUI is not on PyPI)")]


@pytest.fixture(scope="module")
def comfy_objects(tmp_path_factory):
    add_comfy_to_path()
    import comfy.sd

    path = build_sd15_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    return model, clip, vae


@pytest.fixture(scope="module")
def comps(comfy_objects):
    load_pack()
    from attencraft_pack.nodes.bridge import components_from_comfy

    with torch.inference_mode():  # as ComfyUI runs every prompt
        return components_from_comfy(*comfy_objects)


def test_detected_as_sd15(comfy_objects):
    assert type(comfy_objects[0].model.model_config).__name__ == "SD15"


def test_unet_output_matches_comfyui(comfy_objects, comps):
    model = comfy_objects[0]
    x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = comps.denoiser(x, t, ctx).sample
        theirs = model.model.diffusion_model(x, timesteps=t, context=ctx)
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, float(theirs.abs().max()))


def test_text_encoder_matches_comfyui(comfy_objects, comps):
    clip = comfy_objects[1]
    with torch.no_grad():
        theirs = clip.encode_from_tokens(clip.tokenize("a photo of a cat and a dog"))
        ids = comps.tokenizer("a photo of a cat and a dog", padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
        ours = comps.text_encoder(ids)[0]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_vae_matches_comfyui(comfy_objects, comps):
    vae = comfy_objects[2]
    pixels = torch.rand(1, 64, 64, 3)
    with torch.no_grad():
        theirs = vae.encode(pixels) * 0.18215
        ours = comps.vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode() * comps.vae.config.scaling_factor
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-3)


def test_training_runs_under_comfyui_inference_mode(comfy_objects, tmp_path):
    load_pack()
    from attencraft_pack.attencraft_core.concepts import parse_concepts
    from attencraft_pack.attencraft_core.training import Trainer, TrainOptions
    from attencraft_pack.nodes.bridge import components_from_comfy
    from PIL import Image

    before = {k: v.clone() for k, v in comfy_objects[0].model.diffusion_model.state_dict().items()}
    masks = [torch.zeros(512, 512), torch.zeros(512, 512)]
    masks[0][:256], masks[1][256:] = 1, 1
    image = Image.new("RGB", (512, 512), (120, 60, 30))
    with torch.inference_mode():
        with torch.inference_mode(False):
            fresh = components_from_comfy(*comfy_objects)
            trainer = Trainer(fresh, image, parse_concepts("cat, dog"), tmp_path, TrainOptions(steps=2, rank=2),
                              user_masks=masks, class_images=[image], log=lambda s: None)
            result = trainer.run("t")
    assert len(result.history) == 2
    after = comfy_objects[0].model.diffusion_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # ComfyUI's MODEL is untouched


def test_sd2_checkpoint_bridges_exactly(tmp_path):
    """SD 2.x: OpenCLIP-H penultimate layer + final norm, linear-projection UNet with 64-channel heads."""
    add_comfy_to_path()
    import comfy.sd

    load_pack()
    from attencraft_pack.nodes.bridge import components_from_comfy

    path = build_sd15_checkpoint(tmp_path / "tiny_sd2.safetensors", family="sd2")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[:3]
    assert type(model.model.model_config).__name__.startswith("SD2")
    with torch.inference_mode():
        comps = components_from_comfy(model, clip, vae)
    assert comps.family == "sd2" and comps.text_encoder.config.num_hidden_layers == 23
    x, ctx, t = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 1024), torch.tensor([300])
    with torch.no_grad():
        ours = comps.denoiser(x, t, ctx).sample
        theirs = model.model.diffusion_model(x, timesteps=t, context=ctx)
        assert (ours - theirs).abs().max() < 1e-5 * max(1.0, float(theirs.abs().max()))
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
        ids = comps.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(comps.text_encoder(ids)[0], cond.float(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def sdxl_objects():
    """MODEL, CLIP and VAE as ComfyUI's own checkpoint loader makes them from a single-file checkpoint that its
    model detection reads as SDXL (SDXL base's layout at 320 channels per level, full-size text towers and VAE;
    random weights, built once outside the repository)."""
    add_comfy_to_path()
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(build_sdxl_checkpoint()), output_vae=True,
                                                                output_clip=True)
    assert type(model.model.model_config).__name__ == "SDXL"  # ComfyUI's detection, not a class we chose
    return model, clip, vae


def test_sdxl_bridges_exactly(sdxl_objects):
    """SDXL: the UNet with its size/crop conditioning, both text towers (penultimate layers side by side, clip_g's
    pooled projection) and the latent scale, each equal to what ComfyUI computes."""
    load_pack()
    from attencraft_pack.attencraft_core.encoding import encode_prompts
    from attencraft_pack.nodes.bridge import components_from_comfy

    model, clip, vae = sdxl_objects
    with torch.inference_mode():
        comps = components_from_comfy(model, clip, vae)
    assert comps.family == "sdxl" and comps.text_encoder_2.config.hidden_size == 1280
    assert comps.vae.config.scaling_factor == pytest.approx(0.13025)
    prompt = "a photo of a cat and a dog"
    with torch.no_grad():
        tokens = clip.tokenize(prompt)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        latents = torch.randn(1, 4, 32, 48)
        ours = encode_prompts(comps, [prompt], latents)
        torch.testing.assert_close(ours["encoder_hidden_states"], cond.float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours["added_cond_kwargs"]["text_embeds"], pooled.float(), atol=1e-4, rtol=1e-4)
        h, w = 32 * comps.vae_scale_factor, 48 * comps.vae_scale_factor
        y = model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                                   target_height=h)
        t = torch.tensor([400])
        theirs = model.model.diffusion_model(latents, timesteps=t, context=cond, y=y)
        mine = comps.denoiser(latents, t, **ours).sample
    assert (mine - theirs).abs().max() < 1e-4 * max(1.0, float(theirs.abs().max()))


def test_the_gpu_copy_is_built_in_bf16_and_computes_what_comfyui_does(sdxl_objects):
    """What a GPU gets (precision auto = bf16): the UNet and both text towers built straight in bf16, the same
    function as ComfyUI's float32 modules within bf16 rounding. (Built here on the CPU, which only the bridge
    is asked to do: the nodes never choose half precision on a CPU.)"""
    load_pack()
    from attencraft_pack.nodes.bridge import text_encoder_from_comfy, unet_from_comfy

    model, clip, _ = sdxl_objects
    cpu = torch.device("cpu")
    with torch.inference_mode():
        with torch.inference_mode(False):
            unet, _ = unet_from_comfy(model, cpu, torch.bfloat16)
            towers = text_encoder_from_comfy(clip, cpu, torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for m, _ in towers for p in m.parameters()} == {torch.bfloat16}
    x, ctx, pooled, t = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 2048), torch.randn(1, 1280), torch.tensor([400])
    with torch.no_grad():
        y = model.model.encode_adm(pooled_output=pooled, width=256, height=256, crop_w=0, crop_h=0,
                                   target_width=256, target_height=256)
        theirs = model.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
        ours = unet(x.bfloat16(), t, ctx.bfloat16(), added_cond_kwargs={
            "text_embeds": pooled.bfloat16(), "time_ids": torch.tensor([[256, 256, 0, 0, 256, 256]])}).sample
    assert ours.dtype == torch.bfloat16
    error = (ours.float() - theirs).norm() / theirs.norm()
    assert error < 0.05, f"relative error {error:.3f}"


def test_an_sdxl_lora_loads_into_comfyui_with_every_key(sdxl_objects):
    """The kohya export of a LoRA on every attention and feed-forward layer maps onto ComfyUI's SDXL key map."""
    add_comfy_to_path()
    import comfy.lora
    import comfy.sd

    load_pack()
    from attencraft_pack.attencraft_core.lora import add_lora, lora_state_dict, to_kohya
    from attencraft_pack.nodes.bridge import components_from_comfy
    from attencraft_pack.nodes.logic import check_lora_keys

    model, clip, vae = sdxl_objects
    with torch.inference_mode(False):
        comps = components_from_comfy(model, clip, vae)
        add_lora(comps.denoiser, rank=2, targets="all")
        kohya = to_kohya(lora_state_dict(comps.denoiser), 2.0)
    check_lora_keys(kohya, comfy.lora.model_lora_keys_unet(model.model, {}))
    patched, _ = comfy.sd.load_lora_for_models(model, clip, kohya, 1.0, 0.0)
    assert len(patched.patches) == len({k.split(".")[0] for k in kohya})  # every module patched, none skipped


def test_sdxl_trains_in_comfyui_and_its_embeddings_load_in_the_sdxl_tokenizers(sdxl_objects, tmp_path):
    """Train LoRA's path on an SDXL MODEL: training under ComfyUI's inference mode, then the embedding file
    (clip_l + clip_g) that `embedding:<name>` finds in ComfyUI's own SDXL CLIP."""
    add_comfy_to_path()
    import comfy.sd
    from PIL import Image

    load_pack()
    from attencraft_pack.attencraft_core.concepts import parse_concepts
    from attencraft_pack.attencraft_core.training import Trainer, TrainOptions
    from attencraft_pack.nodes.bridge import components_from_comfy
    from attencraft_pack.nodes.logic import fill_prompt, write_embeddings

    model, clip, vae = sdxl_objects
    masks = [torch.zeros(256, 256), torch.zeros(256, 256)]
    masks[0][:128], masks[1][128:] = 1, 1
    image = Image.new("RGB", (256, 256), (120, 60, 30))
    with torch.inference_mode():
        with torch.inference_mode(False):
            comps = components_from_comfy(model, clip, vae)
            opts = TrainOptions(steps=2, rank=2, resolution=256, prior_weight=0)
            result = Trainer(comps, image, parse_concepts("cat, dog"), tmp_path / "run", opts, user_masks=masks,
                             log=lambda s: None).run("xl")
    cs = result.concept_set
    assert cs.family == "sdxl" and cs.widths == [768, 1280]
    names = write_embeddings(cs, "xl", tmp_path / "embeddings")
    prompt = fill_prompt("a photo of <c0>", cs, names)
    import comfy.supported_models

    target = comfy.supported_models.SDXL(dict(SDXL_LAYOUT)).clip_target()  # tokenizing needs no weights
    tokens = comfy.sd.CLIP(target, embedding_directory=str(tmp_path / "embeddings")).tokenize(prompt)
    for tower, row in (("l", cs.embeddings[0][:768]), ("g", cs.embeddings[0][768:])):
        found = [t for t, _ in tokens[tower][0] if isinstance(t, torch.Tensor)]
        assert len(found) == 1, f"clip_{tower} did not load the embedding"
        torch.testing.assert_close(found[0].float().flatten(), row)


SD3_SMALL = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_patches": 36864,
             "pos_embed_max_size": 192, "adm_in_channels": 2048, "pos_embed_scaling_factor": None,
             "context_embedder_config": {"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 128}}}
FLUX_SMALL = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "patch_size": 2, "out_channels": 16,
              "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2,
              "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True}


@pytest.mark.parametrize("kind,unet_config,named", [("SD3", SD3_SMALL, "SD3"),
                                                     ("FluxInpaint", {**FLUX_SMALL, "in_channels": 96}, "Fill")])
def test_sd3_and_flux_fill_models_get_a_node_error_naming_them(kind, unet_config, named):
    """Small SD3 / Flux Fill MODELs built by ComfyUI's own classes: Extract and Train refuse them with a node
    error that names the model kind and what the pack supports, before converting anything."""
    add_comfy_to_path()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    load_pack()
    from attencraft_pack.nodes.bridge import components_from_comfy
    from attencraft_pack.nodes.node_errors import AttenCraftNodeError, node_errors

    model = getattr(comfy.supported_models, kind)(dict(unet_config)).get_model({})
    patcher = comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    execute = node_errors(lambda: components_from_comfy(patcher, None, None))
    with pytest.raises(AttenCraftNodeError, match=f"{named}.*Flux.1 \\(dev, schnell"):
        execute()


def test_a_flux_lora_in_diffusers_names_loads_into_comfyui_with_every_key(caplog):
    """A PEFT LoRA on every attention projection of a diffusers Flux
    transformer (double- and single-stream blocks), saved with diffusers' names under `transformer.`, loads into
    ComfyUI's own Flux model with no key left over (q, k and v land in ComfyUI's fused qkv weights)."""
    add_comfy_to_path()
    import comfy.lora
    import comfy.supported_models
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    model = comfy.supported_models.Flux(dict(FLUX_SMALL)).get_model({})
    transformer = FluxTransformer2DModel(  # FLUX_SMALL in diffusers' terms
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 24, 24))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
    with caplog.at_level("WARNING"):
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model, {}))
    assert "lora key not loaded" not in caplog.text
    assert {k[0] if isinstance(k, tuple) else k for k in patches} >= {
        "diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.double_blocks.0.txt_attn.qkv.weight",
        "diffusion_model.single_blocks.0.linear1.weight"}
