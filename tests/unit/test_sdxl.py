"""SDXL through the family seam, on a tiny random SDXL-shaped model: conditioning exactly as diffusers' SDXL
pipeline computes it, concept tokens in both text towers, training, files, generation, the command line and the
models that are refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attencraft_core import AttenCraftError, parse_concepts
from attencraft_core.cli import main
from attencraft_core.concept_file import ConceptSet
from attencraft_core.concept_tokens import ConceptTokens
from attencraft_core.encoding import encode_prompts
from attencraft_core.families import family_of
from attencraft_core.generation import generate, make_pipeline
from attencraft_core.masks import concept_attention
from attencraft_core.model_loading import load_components
from attencraft_core.settings import MaskOptions
from attencraft_core.training import Trainer, TrainOptions
from attencraft_lab.tiny_models import build_tiny_sdxl_components, save_components
from helpers import class_image, quadrant_blobs, scene_image


@pytest.fixture
def xl():
    return build_tiny_sdxl_components(seed=0)


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return save_components(build_tiny_sdxl_components(seed=0), tmp_path_factory.mktemp("tiny_sdxl"))


def test_conditioning_is_what_the_sdxl_pipeline_computes(xl):
    prompt = "a photo of cat and dog"
    latents = torch.zeros(1, 4, 32, 48)  # 64 x 96 px (the tiny VAE halves)
    cond = encode_prompts(xl, [prompt], latents)
    pipe = make_pipeline(xl)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=xl.device, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled)
    time_ids = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=torch.float32,
                                      text_encoder_projection_dim=xl.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], time_ids)
    assert cond["encoder_hidden_states"].shape[-1] == 32 + 64


def test_each_concept_gets_a_token_in_both_towers_initialised_from_its_word(xl):
    concepts = parse_concepts("cat, dog")
    tokens = ConceptTokens.add(xl, concepts)
    assert tokens.widths == [32, 64] and tokens.rows().shape == (2, 96)
    for (tokenizer, encoder), ids in zip([(xl.tokenizer, xl.text_encoder), (xl.tokenizer_2, xl.text_encoder_2)],
                                         tokens.ids):
        table = encoder.get_input_embeddings().weight
        word_id = tokenizer("cat", add_special_tokens=False).input_ids[0]
        torch.testing.assert_close(table[ids[0]], table[word_id])
    rows = torch.randn(2, 96)
    tokens.set_rows(rows)
    torch.testing.assert_close(tokens.rows(), rows)


@pytest.mark.parametrize("words", ["cat, dog", "cat, dog, bird"])
def test_masks_read_the_32x32_style_cross_attention_of_an_sdxl_unet(xl, words):
    """SDXL has no attention at its top level: the default factors (cross latent/4, self latent/2) exist."""
    concepts = parse_concepts(words)
    ConceptTokens.add(xl, concepts)
    latents = torch.randn(1, 4, 32, 32)
    maps, self_attn, _ = concept_attention(xl, latents, concepts, MaskOptions(), torch.Generator().manual_seed(0))
    assert maps.shape == (len(concepts) + 1, 16, 16) and self_attn.shape == (256, 256)
    assert torch.isfinite(maps).all() and not torch.equal(maps[1], maps[2])


def trainer_for(comps, out, **options):
    opts = TrainOptions(**{"steps": 3, "checkpoint_every": 1, "refresh_every": 2, "rank": 2, **options})
    return Trainer(comps, scene_image(), parse_concepts("cat, dog"), out, opts,
                   user_masks=list(quadrant_blobs(64, 2)), class_images=[class_image()], log=lambda line: None)


def train(comps, out, **options):
    trainer = trainer_for(comps, out, **options)
    return trainer, trainer.run("xl")


def test_training_learns_both_towers_rows_and_writes_comfyui_embedding_keys(xl, tmp_path):
    trainer = trainer_for(xl, tmp_path)
    before = [m.get_input_embeddings().weight.detach().clone() for m in xl.text_modules]
    result = trainer.run("xl")
    for table, ids, old in zip(trainer.tokens.tables, trainer.tokens.ids, before):
        assert not torch.equal(table.detach()[ids], old[ids])
        others = torch.ones(table.shape[0], dtype=torch.bool)
        others[ids] = False
        assert torch.equal(table.detach()[others], old[others])
    cs = ConceptSet.load(result.files["concepts"])
    assert cs.family == "sdxl" and cs.widths == [32, 64] and cs.embeddings.shape == (2, 96)
    emb = load_file(result.files["<c1>"])
    assert set(emb) == {"clip_l", "clip_g"} and emb["clip_l"].shape == (1, 32) and emb["clip_g"].shape == (1, 64)
    torch.testing.assert_close(torch.cat([emb["clip_l"][0], emb["clip_g"][0]]), cs.embeddings[1])
    assert any(k.startswith("lora_unet_") for k in load_file(result.files["lora_kohya"]))


def test_a_trained_sdxl_set_reproduces_its_generations_on_a_fresh_model(tmp_path):
    trained = build_tiny_sdxl_components(seed=0)
    _, result = train(trained, tmp_path)
    image = generate(trained, ["a photo of <c0> on the beach"], seed=3, steps=2)[0]
    fresh = build_tiny_sdxl_components(seed=0)
    ConceptSet.load(result.files["concepts"]).apply(fresh)
    again = generate(fresh, ["a photo of <c0> on the beach"], seed=3, steps=2)[0]
    assert np.array_equal(np.asarray(image), np.asarray(again))
    sd_model = __import__("attencraft_lab.tiny_models", fromlist=["x"]).build_tiny_components(seed=0)
    with pytest.raises(AttenCraftError, match="trained on a sdxl model but the model given is custom-32"):
        ConceptSet.load(result.files["concepts"]).apply(sd_model)


def test_resume_restores_both_towers_exactly(tmp_path):
    from attencraft_core.training import TrainingCancelled

    reference, _ = train(build_tiny_sdxl_components(seed=0), tmp_path / "a", steps=4)
    expected = reference.tokens.rows()

    def stop_at_2(step, steps, record, ratios):
        if step == 2:
            raise TrainingCancelled()

    opts = TrainOptions(steps=4, checkpoint_every=1, refresh_every=2, rank=2)
    first = Trainer(build_tiny_sdxl_components(seed=0), scene_image(), parse_concepts("cat, dog"), tmp_path / "b",
                    opts, user_masks=list(quadrant_blobs(64, 2)), class_images=[class_image()],
                    callback=stop_at_2, log=lambda line: None)
    with pytest.raises(TrainingCancelled):
        first.run("xl")
    resumed = Trainer(build_tiny_sdxl_components(seed=0), scene_image(), parse_concepts("cat, dog"),
                      tmp_path / "b", opts, user_masks=list(quadrant_blobs(64, 2)), class_images=[class_image()],
                      log=lambda line: None)
    assert resumed.resume() == 2
    resumed.run("xl")
    torch.testing.assert_close(resumed.tokens.rows(), expected, atol=0, rtol=0)


def test_v_prediction_sdxl_trains_against_the_velocity(tmp_path):
    comps = build_tiny_sdxl_components(prediction_type="v_prediction")
    trainer, result = train(comps, tmp_path, steps=1)
    latents = torch.randn(1, 4, 8, 8)
    noisy, t, target = family_of(comps).training_sample(comps, latents, torch.Generator().manual_seed(0))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))  # the same draw
    torch.testing.assert_close(noisy, comps.noise_scheduler.add_noise(latents, noise, t))
    torch.testing.assert_close(target, comps.noise_scheduler.get_velocity(latents, noise, t))
    assert np.isfinite(result.history[0]["loss"])


def test_the_command_line_trains_and_generates_on_an_sdxl_folder(xl_dir, scene_png, tmp_path, capsys):
    loaded = load_components(xl_dir)
    assert loaded.family == "sdxl" and loaded.text_encoder_2 is not None
    masks = []
    for i, blob in enumerate(quadrant_blobs(64, 2)):
        path = tmp_path / f"m{i}.png"
        __import__("PIL.Image", fromlist=["Image"]).fromarray((blob.numpy() * 255).astype(np.uint8)).save(path)
        masks.append(str(path))
    out = tmp_path / "run"
    assert main(["train", "--model", str(xl_dir), "--image", str(scene_png), "--concepts", "cat,dog", "--masks",
                 *masks, "--out", str(out), "--steps", "2", "--rank", "2", "--prior-weight", "0", "--quiet"]) == 0
    assert main(["generate", "--model", str(xl_dir), "--concepts", str(out / "attencraft.safetensors"),
                 "--prompt", "a photo of <c0> and <c1>", "--steps", "2", "--out", str(tmp_path / "gen.png"),
                 "--quiet"]) == 0
    assert (tmp_path / "gen.png").is_file()


def test_the_command_line_masks_and_demo_run_on_an_sdxl_folder(xl_dir, scene_png, tmp_path, planted_attention):
    planted_attention(2)
    assert main(["masks", "--model", str(xl_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--out", str(tmp_path / "masks"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "masks" / "masks.json").read_text())
    assert [c["word"] for c in summary["concepts"]] == ["cat", "dog"]
    assert main(["demo", "--model", str(xl_dir), "--image", str(scene_png), "--concepts", "cat,dog", "--steps", "2",
                 "--images", "1", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["final_loss"] > 0 and (tmp_path / "demo" / "contact_sheet.png").is_file()
    assert ConceptSet.load(tmp_path / "demo" / "run" / "demo.safetensors").family == "sdxl"


def refiner(folder):
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")


def edm(folder):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "EDMDPMSolverMultistepScheduler"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,expected", [(refiner, "SDXL refiner"), (edm, "EDM-type model")])
def test_sdxl_kinds_the_method_does_not_fit_are_refused(damage, expected, xl_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(xl_dir, folder)
    damage(folder)
    with pytest.raises(AttenCraftError, match=expected):
        load_components(folder)


@pytest.mark.parametrize("widths,expected", [("[32, 60]", "do not add up to the embeddings' size 96"),
                                             ("not json", "embedding_widths is not valid JSON"),
                                             ('["a", 64]', "do not add up")])
def test_a_damaged_embedding_widths_entry_is_one_clear_error(widths, expected, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, result = train(build_tiny_sdxl_components(seed=0), tmp_path, steps=1)
    path = result.files["concepts"]
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "embedding_widths": widths})
    with pytest.raises(AttenCraftError, match=expected):
        ConceptSet.load(tmp_path / "bad.safetensors")
