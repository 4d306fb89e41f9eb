"""A single-file Flux checkpoint in Load Checkpoint (an all-in-one Flux file) gives the bridge the same Flux
MODEL, CLIP and VAE as the separate loaders (skipped without COMFYUI_DIR; about 17 GB of memory: run it alone)."""

import pytest
import torch

from comfy_support import add_comfy_to_path, build_flux_checkpoint, comfy_dir, load_pack

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(comfy_dir() is None, reason="COMFYUI_DIR is not set (ComfyUI is not on PyPI)")]


def test_an_all_in_one_flux_checkpoint_bridges_and_trains(tmp_path):
    add_comfy_to_path()
    import comfy.lora
    import comfy.sd
    from PIL import Image

    load_pack()
    from attencraft_pack.attencraft_core.concepts import parse_concepts
    from attencraft_pack.attencraft_core.families import family_of
    from attencraft_pack.attencraft_core.training import Trainer, TrainOptions
    from attencraft_pack.nodes.bridge import components_from_comfy
    from attencraft_pack.nodes.logic import check_lora_keys

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(build_flux_checkpoint()), output_vae=True,
                                                            output_clip=True)[:3]
    assert type(model.model.model_config).__name__ == "Flux"
    prompt = "a photo of a cat and a dog"
    masks = [torch.zeros(128, 128), torch.zeros(128, 128)]
    masks[0][:64], masks[1][64:] = 1, 1
    with torch.inference_mode():
        with torch.inference_mode(False):
            comps = components_from_comfy(model, clip, vae)
            with torch.no_grad():
                context, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
                ours = family_of(comps).conditioning(comps, [prompt], (512, 512))
            opts = TrainOptions(steps=1, rank=2, resolution=128, prior_weight=0)
            result = Trainer(comps, Image.new("RGB", (128, 128), (120, 60, 30)), parse_concepts("cat, dog"),
                             tmp_path / "run", opts, user_masks=masks, log=lambda s: None).run("fx")
    assert comps.family == "flux" and comps.native_resolution == 1024
    assert (ours["encoder_hidden_states"] - context.float()).abs().max() < 1e-4 * float(context.abs().max())
    torch.testing.assert_close(ours["pooled_projections"], pooled.float(), atol=1e-4, rtol=1e-4)
    lora = result.concept_set.comfy_lora()
    check_lora_keys(lora, comfy.lora.model_lora_keys_unet(model.model, {}))
