"""AttenCraft on Flux (issue #22), on a tiny random Flux-shaped model saved as a diffusers folder: loading, masks
from joint attention with a derived background, training (LoRA on the double-stream attention, a row in both
text towers), resume, files ComfyUI reads, generation, and the Flux folders that are refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

from attencraft_core import AttenCraftError, parse_concepts
from attencraft_core.cli import main
from attencraft_core.concept_file import ConceptSet
from attencraft_core.generation import generate
from attencraft_core.mask_math import derived_background
from attencraft_core.masks import extract_masks
from attencraft_core.model_loading import load_components
from attencraft_core.training import Trainer, TrainingCancelled, TrainOptions
from attencraft_lab.tiny_flux import build_tiny_flux_pipeline
from helpers import quadrant_blobs, scene_image

WORDS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A schnell-like tiny Flux (no guidance embedding) as a diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny_flux")
    build_tiny_flux_pipeline(seed=0, guidance=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    """A dev-like tiny Flux (guidance embedding)."""
    folder = tmp_path_factory.mktemp("tiny_flux_dev")
    build_tiny_flux_pipeline(seed=0, guidance=True).save_pretrained(folder)
    return folder


def make_trainer(comps, out, n=2, callback=None, **options):
    opts = TrainOptions(**{"steps": 4, "checkpoint_every": 2, "refresh_every": 0, "rank": 2, "prior_weight": 0,
                           **options})
    return Trainer(comps, scene_image(), parse_concepts(WORDS[:n]), out, opts,
                   user_masks=list(quadrant_blobs(64, n)), callback=callback, log=lambda line: None)


def test_a_flux_folder_loads_as_the_flux_family(flux_dir):
    comps = load_components(flux_dir)
    assert comps.family == "flux" and isinstance(comps.denoiser, FluxTransformer2DModel)
    assert comps.native_resolution == 64 and type(comps.text_encoder_2).__name__ == "T5EncoderModel"
    assert all(not p.requires_grad for m in (comps.denoiser, comps.vae, *comps.text_modules) for p in m.parameters())


def test_other_flux_models_are_refused_with_what_is_supported(flux_dir, tmp_path):
    fill = tmp_path / "fill"
    shutil.copytree(flux_dir, fill)
    index = json.loads((fill / "model_index.json").read_text())
    (fill / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    with pytest.raises(AttenCraftError, match="is a FluxFillPipeline model; AttenCraft supports .*Flux.1"):
        load_components(fill)
    control = tmp_path / "control"
    shutil.copytree(flux_dir, control)
    config = json.loads((control / "transformer" / "config.json").read_text())
    (control / "transformer" / "config.json").write_text(json.dumps({**config, "in_channels": 128}))
    with pytest.raises(AttenCraftError, match="128 input channels, not Flux.1's text-to-image"):
        load_components(control)


@pytest.mark.parametrize("n", [2, 3])
def test_masks_come_from_joint_attention_with_a_derived_background(flux_dir, planted_attention, n):
    """With the T5 tokens of the concepts attending to their blobs, each concept's mask is its blob (on the 2x2
    patch grid), and the background map is derived from the concepts' maps (T5 has no start token)."""
    blobs = planted_attention(n, first=3)  # "a photo of <c0> and <c1>" in T5: <c0> is token 3
    comps = load_components(flux_dir)
    result = extract_masks(comps, scene_image(), parse_concepts(WORDS[:n]))
    assert result.masks_lowres.shape == (n, 16, 16)  # 64 px -> 32x32 latents -> 16x16 patches
    for k in range(n):
        iou = (result.masks_lowres[k] & blobs[k]).sum() / (result.masks_lowres[k] | blobs[k]).sum()
        assert iou > 0.9, (k, float(iou))
    torch.testing.assert_close(result.token_attention[0], derived_background(result.token_attention[1:]))
    assert result.masks.shape == (n, 64, 64)


def test_training_learns_both_text_rows_and_the_double_stream_lora_and_writes_what_comfyui_reads(flux_dir,
                                                                                                 tmp_path):
    comps = load_components(flux_dir)
    trainer = make_trainer(comps, tmp_path, steps=3)
    before = trainer.tokens.rows().clone()
    result = trainer.run("fl")
    assert all("attention" in record for record in result.history)  # the joint attention is read and pulled
    assert comps.text_encoder_2.get_input_embeddings().weight.shape[0] > len(comps.tokenizer_2)  # as real T5
    width = comps.text_encoder.config.hidden_size
    changed = (trainer.tokens.rows() - before).abs()
    assert bool((changed[:, :width].amax(1) > 0).all()) and bool((changed[:, width:].amax(1) > 0).all())
    lora = load_file(result.files["lora_diffusers"])
    modules = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in lora if k.endswith("lora_A.weight")}
    assert modules == {f"transformer_blocks.0.attn.{p}" for p in ("to_k", "to_v", "add_k_proj", "add_v_proj")}
    assert all(f"transformer.{m}.alpha" in lora for m in modules)
    for i in range(2):
        embedding = load_file(result.files[f"<c{i}>"])
        assert {k: tuple(v.shape) for k, v in embedding.items()} == {"clip_l": (1, 32), "t5xxl": (1, 32)}


def test_single_stream_attention_is_optional(flux_dir, tmp_path):
    comps = load_components(flux_dir)
    make_trainer(comps, tmp_path, steps=1, targets="attn").run("fl")
    names = {n for n, _ in comps.denoiser.named_parameters() if "lora_A" in n}
    assert any(n.startswith("single_transformer_blocks.0.attn.to_q") for n in names)
    assert any(n.startswith("transformer_blocks.0.attn.add_q_proj") for n in names)


def test_resume_equals_an_uninterrupted_run(flux_dir, tmp_path):
    reference_comps = load_components(flux_dir)
    reference = make_trainer(reference_comps, tmp_path / "a")
    reference.run("r")

    def stop_at_2(step, steps, record, ratios):
        if step == 2:
            raise TrainingCancelled()

    with pytest.raises(TrainingCancelled):
        make_trainer(load_components(flux_dir), tmp_path / "b", callback=stop_at_2).run("r")
    comps = load_components(flux_dir)
    resumed = make_trainer(comps, tmp_path / "b")
    assert resumed.resume() == 2
    resumed.run("r")
    lora = dict(comps.denoiser.named_parameters())
    for name, param in reference_comps.denoiser.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(lora[name], param, atol=0, rtol=0)
    torch.testing.assert_close(resumed.tokens.rows(), reference.tokens.rows(), atol=0, rtol=0)


@pytest.mark.parametrize("model", ["flux_dir", "dev_dir"])
def test_a_saved_set_applies_and_generates_the_same_images(model, request, tmp_path):
    """schnell-like: true classifier-free guidance with the negative prompt; dev-like: cfg is the embedded
    guidance. Either way a set saved, loaded into a fresh model and applied draws what the trained model draws."""
    folder = request.getfixturevalue(model)
    comps = load_components(folder)
    result = make_trainer(comps, tmp_path, steps=2).run("fl")
    prompt = "a photo of <c0> and <c1>"
    drawn = generate(comps, [prompt], seed=3, steps=3, cfg=2.0)
    fresh = load_components(folder)
    ConceptSet.load(result.files["concepts"]).apply(fresh)
    again = generate(fresh, [prompt], seed=3, steps=3, cfg=2.0)
    assert drawn[0].size == (64, 64) and np.array_equal(np.asarray(drawn[0]), np.asarray(again[0]))
    other_cfg = generate(fresh, [prompt], seed=3, steps=3, cfg=5.0)
    assert not np.array_equal(np.asarray(other_cfg[0]), np.asarray(again[0]))  # the guidance reaches the sampler


def test_gradient_checkpointing_trains_the_same_weights_on_flux(flux_dir, tmp_path):
    plain_comps, checkpointed_comps = load_components(flux_dir), load_components(flux_dir)
    plain = make_trainer(plain_comps, tmp_path / "a", steps=2)
    plain.run("p")
    checkpointed = make_trainer(checkpointed_comps, tmp_path / "b", steps=2, gradient_checkpointing=True)
    checkpointed.run("c")
    lora = dict(checkpointed_comps.denoiser.named_parameters())
    for name, param in plain_comps.denoiser.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(lora[name], param, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(checkpointed.tokens.rows(), plain.tokens.rows(), atol=1e-5, rtol=1e-4)


def test_the_command_line_trains_and_generates_on_a_flux_folder(flux_dir, tmp_path, capsys):
    image = tmp_path / "scene.png"
    scene_image().save(image)
    masks = []
    for i, mask in enumerate(quadrant_blobs(64, 2)):
        masks.append(tmp_path / f"m{i}.png")
        Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(masks[-1])
    out = tmp_path / "run"
    code = main(["train", "--model", str(flux_dir), "--image", str(image), "--concepts", "cat,dog", "--masks",
                 ",".join(map(str, masks)), "--out", str(out), "--steps", "2", "--rank", "2", "--prior-weight", "0",
                 "--name", "fl"])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.glob("fl*.safetensors")} == {"fl.safetensors", "fl_lora_diffusers.safetensors",
                                                              "fl_c0.safetensors", "fl_c1.safetensors"}
    drawn = tmp_path / "gen.png"
    code = main(["generate", "--model", str(flux_dir), "--concepts", str(out / "fl.safetensors"), "--prompt",
                 "a photo of <c0> on the beach", "--out", str(drawn), "--steps", "2"])
    assert code == 0 and Image.open(drawn).size == (64, 64)
