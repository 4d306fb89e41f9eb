"""The ComfyUI nodes' logic as plain functions on the tiny model (no ComfyUI needed)."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from comfy_support import load_pack
from helpers import quadrant_blobs, two_object_array

load_pack()
from attencraft_pack.attencraft_core.attention import AttentionStore  # noqa: E402
from attencraft_pack.attencraft_core.concept_file import ConceptSet  # noqa: E402
from attencraft_pack.attencraft_core.concepts import Concept  # noqa: E402
from attencraft_pack.attencraft_core.errors import AttenCraftError  # noqa: E402
from attencraft_pack.attencraft_core.settings import MaskOptions  # noqa: E402
from attencraft_pack.nodes import logic  # noqa: E402


def comfy_image(array):
    return torch.from_numpy(array.astype(np.float32) / 255.0)[None]


def test_comfy_image_conversion_and_notes():
    rgba = np.concatenate([two_object_array(), np.full((64, 64, 1), 255, np.uint8)], -1)
    image, notes = logic.image_from_comfy(torch.cat([comfy_image(rgba)] * 2))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert any("first one is used" in n for n in notes) and any("RGBA" in n for n in notes)
    back = logic.image_to_comfy(image)
    assert back.shape == (1, 64, 64, 3) and torch.allclose(back, comfy_image(two_object_array()), atol=1 / 255)
    with pytest.raises(AttenCraftError, match="No image"):
        logic.image_from_comfy(torch.zeros(0, 64, 64, 3))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_from_a_node_are_an_error_naming_the_input(value):
    image = comfy_image(two_object_array())
    image[0, 5, 5, 1] = value
    with pytest.raises(AttenCraftError, match="The image input holds NaN or infinite pixel values"):
        logic.image_from_comfy(image)
    with pytest.raises(AttenCraftError, match="The prior_images input holds NaN"):
        logic.images_from_comfy(torch.cat([comfy_image(two_object_array()), image]))


def test_extract_gives_masks_overlay_and_concepts(tiny, planted_attention):
    blobs = planted_attention(2, AttentionStore)
    opts = MaskOptions(seed=0, t_min=0, t_max=300, threshold=0.1)
    masks, preview, value = logic.extract(tiny, comfy_image(two_object_array()), "cat, dog", opts)
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.float32
    assert preview.shape == (1, 64, 64, 3) and 0 <= float(preview.min()) and float(preview.max()) <= 1
    assert [c.word for c in value.concepts] == ["cat", "dog"] and len(value.scores) == 2
    low = torch.nn.functional.interpolate(masks[None], size=(16, 16), mode="area")[0] > 0.5
    assert float((low == blobs).float().mean()) > 0.95
    with pytest.raises(AttenCraftError, match="at least two concepts"):
        logic.extract(tiny, comfy_image(two_object_array()), "cat", opts)


def test_training_inputs_from_either_source():
    extracted = logic.ExtractedConcepts([Concept("cat", "<c0>"), Concept("dog", "<c1>")],
                                        quadrant_blobs(64, 2), [0.5, 0.5], [])
    concepts, masks = logic.training_inputs(extracted, None, "")
    assert [c.word for c in concepts] == ["cat", "dog"] and len(masks) == 2
    concepts, masks = logic.training_inputs(None, quadrant_blobs(64, 3), "a, b, c")
    assert [c.placeholder for c in concepts] == ["<c0>", "<c1>", "<c2>"] and len(masks) == 3
    with pytest.raises(AttenCraftError, match="Connect the concepts output"):
        logic.training_inputs(None, None, "")


@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a/b", "a\\b", "", "..", " ", "x" * 70])
def test_names_that_escape_the_folder_are_refused(name):
    with pytest.raises(AttenCraftError, match="is not allowed"):
        logic.check_name(name)


def test_good_names_pass():
    assert logic.check_name(" my concepts_v1.2 ") == "my concepts_v1.2"


def concept_set(family, dim, tiny_unet=None):
    lora = {}
    if tiny_unet is not None:
        from attencraft_pack.attencraft_core.lora import add_lora, lora_state_dict
        add_lora(tiny_unet, rank=2, alpha=4.0)
        lora = lora_state_dict(tiny_unet)
    return ConceptSet([Concept("cat", "<c0>"), Concept("dog", "<c1>")], torch.randn(2, dim), lora, 2, 4.0, "kv",
                      family)


def test_files_land_in_comfyui_folders_with_the_keys_its_loaders_read(tiny, tmp_path):
    cs = concept_set("sd1", 768, tiny.denoiser)
    paths = logic.comfy_file_paths("duo", tmp_path / "loras", tmp_path / "sets")
    logic.write_comfy_files(cs, paths)
    names = logic.write_embeddings(cs, "duo", tmp_path / "embeddings")
    assert paths["lora"] == tmp_path / "loras" / "attencraft" / "duo.safetensors"
    assert ConceptSet.load(tmp_path / "sets" / "duo.safetensors").family == "sd1"
    for i, name in enumerate(names):
        assert name == f"attencraft/duo_{cs.content_hash()}_c{i}"
        emb = load_file(tmp_path / "embeddings" / f"{name}.safetensors")
        assert list(emb) == ["clip_l"] and emb["clip_l"].shape == (1, 768)
        torch.testing.assert_close(emb["clip_l"][0], cs.embeddings[i])
    # ComfyUI maps "lora_unet_" + diffusers module path with "_" onto UNet weights (comfy.lora.model_lora_keys_unet)
    key_map = {"lora_unet_" + n.replace(".", "_"): n for n, m in tiny.denoiser.named_modules() if hasattr(m, "weight")}
    kohya = load_file(paths["lora"])
    logic.check_lora_keys(kohya, key_map)
    suffixes = {k.split(".", 1)[1] for k in kohya}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(float(v) == 4.0 for k, v in kohya.items() if k.endswith(".alpha"))


def test_two_sets_under_one_name_never_share_an_embedding_name(tmp_path):
    """Set B trained under set A's name must not render with A's embeddings (the stale-embedding case)."""
    a, b = concept_set("sd1", 768), concept_set("sd1", 768)
    names_a = logic.write_embeddings(a, "shared name", tmp_path)
    names_b = logic.write_embeddings(b, "shared name", tmp_path)
    assert not set(names_a) & set(names_b) and all(" " not in n for n in names_a)
    for name, cs in ((names_a[0], a), (names_b[0], b)):
        torch.testing.assert_close(load_file(tmp_path / f"{name}.safetensors")["clip_l"][0], cs.embeddings[0])
    again = ConceptSet(a.concepts, a.embeddings.clone(), {}, 2, 4.0, "kv", "sd1")
    assert logic.embedding_names(again, "shared name") == names_a  # same content, same names


def test_embeddings_are_rewritten_on_every_apply(tmp_path):
    cs = concept_set("sd1", 768)
    name = logic.write_embeddings(cs, "duo", tmp_path)[0]
    (tmp_path / f"{name}.safetensors").write_bytes(b"damaged")
    logic.write_embeddings(cs, "duo", tmp_path)
    torch.testing.assert_close(load_file(tmp_path / f"{name}.safetensors")["clip_l"][0], cs.embeddings[0])


def test_sd2_embeddings_use_clip_h(tmp_path):
    cs = concept_set("sd2", 1024)
    cs.save_embedding(1, tmp_path / "e.safetensors")
    assert load_file(tmp_path / "e.safetensors")["clip_h"].shape == (1, 1024)


def test_unknown_lora_keys_are_an_error():
    with pytest.raises(AttenCraftError, match="1 LoRA layers do not match this MODEL"):
        logic.check_lora_keys({"lora_unet_nowhere.lora_down.weight": torch.zeros(1)}, {"lora_unet_x": "x"})


def test_prompts_name_each_concept_by_its_embedding():
    cs = concept_set("sd1", 768)
    names = logic.embedding_names(cs, "duo")
    assert logic.together_prompt(cs, names) == f"a photo of embedding:{names[0]} and embedding:{names[1]}"
    assert logic.fill_prompt("a photo of <c1> on the beach", cs, names) == \
        f"a photo of embedding:{names[1]} on the beach"
    # ComfyUI needs a space (or the start, or a bracket) before embedding:
    assert logic.fill_prompt("<c0>,(<c1>:1.2) x<c0>", cs, names) == \
        f"embedding:{names[0]},(embedding:{names[1]}:1.2) x embedding:{names[0]}"
    with pytest.raises(AttenCraftError, match="uses <c2>.*defines: <c0> \\(cat\\), <c1> \\(dog\\)"):
        logic.fill_prompt("a photo of <c2>", cs, names)
    text = logic.prompt_syntax(cs, names)
    assert f"<c0> = cat: embedding:{names[0]}" in text and f"<c1> = dog: embedding:{names[1]}" in text


def test_a_name_in_use_needs_resume_or_overwrite(tmp_path):
    assert logic.training_plan("duo", tmp_path, resume=False, overwrite=False) == ("new", [])
    concept_set("sd1", 768).save(tmp_path / "duo.safetensors")
    with pytest.raises(AttenCraftError, match="'duo' is already used by a concept set: turn on overwrite"):
        logic.training_plan("duo", tmp_path, resume=False, overwrite=False)
    assert logic.training_plan("duo", tmp_path, resume=False, overwrite=True)[0] == "replace"
    with pytest.raises(AttenCraftError, match="no checkpoint to resume"):
        logic.training_plan("duo", tmp_path, resume=True, overwrite=False)
    (tmp_path / "duo_run").mkdir()
    (tmp_path / "duo_run" / "checkpoint.safetensors").write_bytes(b"x")
    assert logic.training_plan("duo", tmp_path, resume=True, overwrite=False)[0] == "resume"
    (tmp_path / "duo.safetensors").unlink()
    with pytest.raises(AttenCraftError, match="a stopped run"):  # a stopped run is not replaced silently either
        logic.training_plan("duo", tmp_path, resume=False, overwrite=False)
    assert logic.training_plan("new one", tmp_path, resume=True, overwrite=False)[0] == "new"


SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
SD21_UNET = {**SD15_UNET, "use_linear_in_transformer": True, "context_dim": 1024, "num_heads": -1,
             "num_head_channels": 64}


# ComfyUI's detection of SDXL base 1.0, and the diffusers config it was released with (unet/config.json)
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL_DIFFUSERS = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)


def test_comfy_sdxl_unet_config_becomes_the_released_sdxl_config():
    from diffusers import UNet2DConditionModel

    from attencraft_pack.nodes.bridge import unet_config_to_diffusers

    config = unet_config_to_diffusers(SDXL_UNET, sample_size=128)
    for key, value in SDXL_DIFFUSERS.items():
        assert config[key] == value, key
    with torch.device("meta"):
        ours, released = UNet2DConditionModel(**config), UNet2DConditionModel(**SDXL_DIFFUSERS)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == \
        [(n, p.shape) for n, p in released.named_parameters()]


@pytest.mark.parametrize("unet_config, params, heads, linear", [
    (SD15_UNET, 859_520_964, 8, False),        # runwayml/stable-diffusion-v1-5 UNet
    (SD21_UNET, 865_910_724, [5, 10, 20, 20], True),  # stabilityai/stable-diffusion-2-1(-base) UNet
])
def test_comfy_unet_config_becomes_the_diffusers_sd_config(unet_config, params, heads, linear):
    from diffusers import UNet2DConditionModel

    from attencraft_pack.nodes.bridge import unet_config_to_diffusers

    config = unet_config_to_diffusers(unet_config)
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert config["attention_head_dim"] == heads and config["use_linear_projection"] is linear
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == params


def test_other_model_families_are_refused():
    from attencraft_pack.nodes.bridge import unet_config_to_diffusers

    refiner = {**SDXL_UNET, "adm_in_channels": 2560, "context_dim": 1280, "model_channels": 384}
    with pytest.raises(AttenCraftError, match="SDXL .* and Flux.1 .* this MODEL is another kind \\(the SDXL refiner"):
        unet_config_to_diffusers(refiner)
