"""The ComfyUI -> diffusers bridge against a real ComfyUI, in-process (skipped without COMFYUI_DIR)."""

import pytest
import torch

from comfy_support import add_comfy_to_path, build_sd15_checkpoint, comfy_dir, load_pack

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
        ours = comps.unet(x, t, ctx).sample
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
        ours = comps.unet(x, t, ctx).sample
        theirs = model.model.diffusion_model(x, timesteps=t, context=ctx)
        assert (ours - theirs).abs().max() < 1e-5 * max(1.0, float(theirs.abs().max()))
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
        ids = comps.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(comps.text_encoder(ids)[0], cond.float(), atol=1e-4, rtol=1e-4)
