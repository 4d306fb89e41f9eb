"""Training: what changes, files written, save/load/generate, kohya round trip, resume, interruption, bad input."""

import copy
import json
import os
import re
import socket
import stat
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from attencraft_core import AttenCraftError, parse_concepts
from attencraft_core.checkpoint import load_checkpoint, save_checkpoint
from attencraft_core.cli import main
from attencraft_core.concept_file import ConceptSet, embedding_key
from attencraft_core.concept_tokens import ConceptTokens
from attencraft_core.families import family_of
from attencraft_core.generation import class_images, generate
from attencraft_core.lora import from_kohya, lora_deltas, set_lora_strength
from attencraft_core.outputs import atomic_write, write_json
from attencraft_core.run_folder import RunLock, is_snapshot
from attencraft_lab.tiny_models import build_tiny_components
from attencraft_core.training import (Trainer, TrainingCancelled, TrainOptions, attach_trainables,
                                      prepare_inputs)
from helpers import class_image, quadrant_blobs, scene_image, two_object_array

WORDS = "cat, dog, bird"


def scene():
    return scene_image()


def user_masks(n):
    return list(quadrant_blobs(64, n))


def class_imgs():
    return [class_image()]


def make_trainer(comps, out, n=2, callback=None, masks="user", **options):
    opts = TrainOptions(**{"steps": 4, "checkpoint_every": 2, "refresh_every": 0, "rank": 4, **options})
    concepts = parse_concepts(WORDS.split(", ")[:n])
    return Trainer(comps, scene(), concepts, out, opts, user_masks=user_masks(n) if masks == "user" else None,
                   class_images=class_imgs(), callback=callback, log=lambda line: None)


def trained_state(comps, trainer):
    """The trainer's LoRA weights and concept rows now (mid-run too)."""
    lora = {n: p.detach().clone() for n, p in comps.denoiser.named_parameters() if "lora_" in n}
    return lora, trainer.tokens.rows()


def test_training_changes_every_lora_weight_and_every_concept_embedding_and_nothing_else(tiny, tmp_path):
    frozen = {f"unet.{k}": v.clone() for k, v in tiny.denoiser.state_dict().items()}
    frozen.update({f"vae.{k}": v.clone() for k, v in tiny.vae.state_dict().items()})
    frozen.update({f"te.{k}": v.clone() for k, v in tiny.text_encoder.state_dict().items()})
    trainer = make_trainer(tiny, tmp_path, n=3, alpha=8.0)
    table_before = tiny.text_encoder.get_input_embeddings().weight.detach().clone()  # after token init
    lora_before = {n: p.detach().clone() for n, p in tiny.denoiser.named_parameters() if "lora_" in n}
    assert lora_before, "no LoRA parameters were added"
    result = trainer.run("t")
    assert all(np.isfinite(h["loss"]) for h in result.history) and len(result.history) == 4
    for name, p in tiny.denoiser.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, lora_before[name]), f"{name} did not change"
            assert ".attn2.to_k." in name or ".attn2.to_v." in name  # default targets: cross-attention k/v
    table = tiny.text_encoder.get_input_embeddings().weight.detach()
    for token_id in trainer.token_ids:  # every concept, the last one included
        assert not torch.equal(table[token_id], table_before[token_id]), f"token {token_id} did not move"
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[trainer.token_ids] = False
    assert torch.equal(table[others], table_before[others])
    state = {f"unet.{k}": v for k, v in tiny.denoiser.state_dict().items() if "lora_" not in k}
    state = {k.replace(".base_layer", ""): v for k, v in state.items()}
    state.update({f"vae.{k}": v for k, v in tiny.vae.state_dict().items()})
    state.update({f"te.{k}": v for k, v in tiny.text_encoder.state_dict().items()
                  if "token_embedding" not in k})
    for key, value in state.items():
        assert torch.equal(value, frozen[key]), f"base weight {key} changed"


def test_inputs_are_prepared_on_their_own(tiny):
    """prepare_inputs: tokens added, latents and prior latents encoded, the user's masks at attention resolution
    with their scores; no LoRA is attached yet."""
    concepts = parse_concepts("cat, dog")
    inputs = prepare_inputs(tiny, scene(), concepts, TrainOptions(), user_masks=user_masks(2),
                            class_images=class_imgs())
    assert len(inputs.tokens.ids[0]) == 2 and inputs.latents.shape[0] == 1 and inputs.class_latents.shape[0] == 1
    assert inputs.masks.dtype == torch.bool and inputs.masks.shape == (2, 16, 16) and inputs.scores.shape == (2,)
    assert not any("lora_" in n for n, _ in tiny.denoiser.named_parameters())
    no_prior = prepare_inputs(tiny, scene(), concepts, TrainOptions(prior_weight=0), user_masks=user_masks(2))
    assert no_prior.class_latents is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_frozen_weights_train_float32_lora_and_rows(tiny, tmp_path, dtype):
    """The GPU memory path, exercised on the CPU: UNet and text towers frozen in half precision (as a GPU run
    loads them), LoRA and concept rows learned in float32, the VAE float32, the result resumable."""
    tiny.to(tiny.device, dtype)
    assert tiny.denoiser.conv_in.weight.dtype == dtype and tiny.vae.decoder.conv_out.weight.dtype == torch.float32
    frozen = tiny.denoiser.conv_in.weight.detach().clone()
    trainer = make_trainer(tiny, tmp_path, keep_checkpoint=True)
    rows_before = trainer.tokens.rows()
    assert all(p.dtype == torch.float32 for p in trainer.lora + trainer.trainables.embeddings)
    assert trainer.trainables.scaler.is_enabled() == (dtype == torch.float16)  # fp16 gradients are loss-scaled
    result = trainer.run("half")
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert not torch.equal(result.concept_set.embeddings, rows_before)
    assert any(v.abs().sum() > 0 for k, v in result.concept_set.lora.items() if "lora_B" in k)
    assert torch.equal(tiny.denoiser.conv_in.weight, frozen) and tiny.denoiser.conv_in.weight.dtype == dtype
    assert tiny.text_encoder.get_input_embeddings().weight.dtype == dtype
    assert load_checkpoint(tmp_path / "checkpoint.safetensors")[1]["dtype"] == str(dtype).removeprefix("torch.")


def test_trainables_attach_and_release(tiny):
    tokens = ConceptTokens.add(tiny, parse_concepts("cat, dog"))
    token_ids = tokens.ids[0]
    table = tiny.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    trainables = attach_trainables(tiny, tokens, TrainOptions(rank=2))
    (rows,) = trainables.embeddings
    assert rows.shape == (2, table.shape[1]) and rows.dtype == torch.float32 and rows.requires_grad
    assert trainables.lora and all(p.requires_grad and p.dtype == torch.float32 for p in trainables.lora)
    assert not table.requires_grad  # the vocabulary stays frozen; only the concept rows learn
    with torch.no_grad():
        rows[1] += 1.0
    ids = torch.tensor([[token_ids[0], token_ids[1], 5]])
    seen = tiny.text_encoder.get_input_embeddings()(ids)  # the tower reads the learned rows
    assert torch.equal(seen[0, 1], rows[1].detach()) and torch.equal(seen[0, 2], table[5])
    seen.sum().backward()
    assert rows.grad is not None and table.grad is None
    trainables.release(tiny.denoiser)
    assert torch.equal(table[token_ids[1]], before[token_ids[1]] + 1.0)  # written back on release
    assert torch.equal(tiny.text_encoder.get_input_embeddings()(ids)[0, 1], table[token_ids[1]])  # no hook left
    assert not any(p.requires_grad for p in trainables.lora)
    assert not tiny.denoiser.training


def test_outputs_and_file_formats(trained_pair):
    result = trained_pair.result
    files = result.files
    for key in ("concepts", "lora_kohya", "<c0>", "<c1>", "loss_curve", "log", "mask_0", "mask_1"):
        assert files[key].is_file(), key
    assert not (trained_pair.out / "checkpoint.safetensors").exists()  # a finished run drops it by default
    kohya = load_file(files["lora_kohya"])
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in kohya)
    for k in downs:
        base = k[: -len(".lora_down.weight")]
        assert float(kohya[f"{base}.alpha"]) == 6.0  # the real alpha, not the rank (4)
        assert kohya[k].shape[0] == 4 and f"{base}.lora_up.weight" in kohya
    emb = load_file(files["<c1>"])
    assert list(emb) == [embedding_key("custom-32")] and emb["emb_params"].shape == (1, 32)
    assert embedding_key("sd1") == "clip_l" and embedding_key("sd2") == "clip_h"
    loaded = ConceptSet.load(files["concepts"])
    assert [c.word for c in loaded.concepts] == ["cat", "dog"] and loaded.family == "custom-32"
    assert loaded.masks.shape == (2, 16, 16) and loaded.alpha == 6.0 and loaded.rank == 4
    assert loaded.training["steps"] == 4 and loaded.training["policy"] == "adaptive"
    torch.testing.assert_close(loaded.embeddings, result.concept_set.embeddings)
    log = json.loads(files["log"].read_text())
    assert len(log["history"]) == 4 and "final_sampling_ratios" in log
    assert Image.open(files["loss_curve"]).size == (640, 360)


def test_kohya_export_loads_back_to_the_same_deltas(trained_pair):
    result, tiny = trained_pair.result, trained_pair.comps
    kohya = load_file(result.files["lora_kohya"])
    paths = [n for n, _ in tiny.denoiser.named_modules()]
    state, alphas = from_kohya(kohya, paths)
    original = lora_deltas(result.concept_set.lora, {p: 6.0 for p in alphas})
    restored = lora_deltas(state, alphas)
    assert original.keys() == restored.keys() and len(original) == len(alphas) > 0
    for path in original:
        torch.testing.assert_close(restored[path], original[path])
    # and the delta is what PEFT applies: base + delta == the LoRA-wrapped layer's effective weight
    path = next(iter(original))
    layer = dict(tiny.denoiser.named_modules())[path]
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ original[path].T, atol=1e-5, rtol=1e-4)


def test_strength_scales_the_lora_weight_change_like_comfyui(trained_pair):
    result = trained_pair.result
    concept_set = ConceptSet.load(result.files["concepts"])
    generator = torch.Generator().manual_seed(0)  # four steps barely move B from zero: a clearly visible change
    concept_set.lora = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in concept_set.lora.items()}
    deltas = lora_deltas(concept_set.lora, {p: 6.0 for p in {k.rsplit(".lora_", 1)[0] for k in concept_set.lora}})
    for strength in (0.5, 0.0, 1.0):
        fresh = build_tiny_components(seed=0)
        concept_set.apply(fresh, strength)
        for path in list(deltas)[:3]:
            layer = dict(fresh.denoiser.named_modules())[path]
            x = torch.randn(3, layer.in_features)
            assert (x @ deltas[path].T).abs().max() > 1e-3  # a change large enough to tell strengths apart
            torch.testing.assert_close(layer(x), layer.base_layer(x) + strength * x @ deltas[path].T,
                                       atol=1e-5, rtol=1e-4)
    with pytest.raises(AttenCraftError, match="no AttenCraft LoRA"):
        set_lora_strength(build_tiny_components(seed=0).denoiser, 0.5)


def test_save_load_generate_gives_identical_images(trained_pair):
    result = trained_pair.result
    prompt = "a photo of <c1> on the beach"
    trained = generate(trained_pair.comps, [prompt], seed=3, steps=2)[0]
    fresh = build_tiny_components(seed=0)
    ConceptSet.load(result.files["concepts"]).apply(fresh)
    again = generate(fresh, [prompt], seed=3, steps=2)[0]
    assert np.array_equal(np.asarray(trained), np.asarray(again))
    base = generate(build_tiny_components(seed=0), ["a photo of cat on the beach"], seed=3, steps=2)[0]
    assert not np.array_equal(np.asarray(base), np.asarray(again))


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = build_tiny_components(seed=0)
    reference = make_trainer(full, tmp_path / "a", steps=6, checkpoint_every=3)
    reference.run("r")
    expected = trained_state(full, reference)

    def stop_at_3(step, steps, record, ratios):
        if step == 3:
            raise TrainingCancelled()

    first = build_tiny_components(seed=0)
    with pytest.raises(TrainingCancelled):
        make_trainer(first, tmp_path / "b", steps=6, checkpoint_every=3, callback=stop_at_3).run("r")
    second = build_tiny_components(seed=0)
    resumed = make_trainer(second, tmp_path / "b", steps=6, checkpoint_every=3)
    assert resumed.resume() == 3
    result = resumed.run("r")
    got = trained_state(second, resumed)
    for name in expected[0]:
        torch.testing.assert_close(got[0][name], expected[0][name], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)
    assert [h["step"] for h in result.history] == list(range(1, 7))


class PlantedPickle:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint in a shared run folder would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("file_name", ["checkpoint.pt", "checkpoint.safetensors"])
def test_resume_never_unpickles_a_planted_checkpoint(tiny, tmp_path, file_name):
    marker = tmp_path / "code_ran"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": PlantedPickle(marker)}, run / file_name)
    trainer = make_trainer(tiny, run)
    with pytest.raises(AttenCraftError, match="checkpoint") as caught:
        trainer.resume()
    assert not marker.exists(), "the planted pickle ran"
    assert "without --resume" in str(caught.value) or "new folder" in str(caught.value)


def test_resume_refuses_a_diverged_or_truncated_checkpoint(tmp_path):
    make_trainer(build_tiny_components(seed=0), tmp_path, steps=2, checkpoint_every=2, keep_checkpoint=True).run("r")
    path = tmp_path / "checkpoint.safetensors"
    tensors, info = load_checkpoint(path)
    good = path.read_bytes()
    lora_key = next(k for k in tensors if k.startswith("lora."))
    tensors[lora_key] = torch.full_like(tensors[lora_key], float("nan"))
    save_checkpoint(path, tensors, info)
    with pytest.raises(AttenCraftError, match=f"non-finite values in {re.escape(lora_key)}"):
        make_trainer(build_tiny_components(seed=0), tmp_path).resume()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(AttenCraftError, match="not a readable AttenCraft checkpoint"):
        make_trainer(build_tiny_components(seed=0), tmp_path).resume()


def test_interruption_keeps_earlier_outputs_intact(tmp_path):
    """A finished run's files survive a later run in the same folder that is interrupted: here the run is
    resumed for more steps and stopped at once (a new run would be refused, see below)."""
    make_trainer(build_tiny_components(seed=0), tmp_path, steps=4, keep_checkpoint=True).run("keep")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "checkpoint.safetensors"}

    def boom(step, steps, record, ratios):
        raise KeyboardInterrupt

    resumed = make_trainer(build_tiny_components(seed=0), tmp_path, callback=boom, steps=6, checkpoint_every=1)
    assert resumed.resume() == 4
    with pytest.raises(KeyboardInterrupt):
        resumed.run("keep")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "checkpoint.safetensors"}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name == "run.lock"]


def test_a_new_run_refuses_a_folder_with_another_runs_files_unless_told_to_replace_them(tmp_path):
    """A 2-concept run after a 3-concept run must not leave the old <name>_c2 embedding and masks beside its own."""
    make_trainer(build_tiny_components(seed=0), tmp_path, n=3).run("set")
    assert (tmp_path / "set_c2.safetensors").is_file()
    (tmp_path / "notes.txt").write_text("the user's own file")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(AttenCraftError, match="holds another training run's files.*--overwrite"):
        make_trainer(build_tiny_components(seed=0), tmp_path, n=2).run("set")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    make_trainer(build_tiny_components(seed=0), tmp_path, n=2).run("set", replace=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert "set_c1.safetensors" in names and "set_c2.safetensors" not in names
    assert not any(n.startswith("set_mask_2_") for n in names) and "notes.txt" in names


def test_one_run_per_folder_a_second_one_names_the_holder(tmp_path):
    trainer = make_trainer(build_tiny_components(seed=0), tmp_path)
    with RunLock(tmp_path):
        with pytest.raises(AttenCraftError, match=f"in use by another training run \\(pid {os.getpid()}"):
            trainer.run("busy")
    assert not list(tmp_path.glob("*.safetensors"))
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    trainer.run("busy")  # a lock whose process is gone is stale and taken over
    assert (tmp_path / "busy.safetensors").is_file() and not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("change,field", [
    (dict(image=Image.fromarray(two_object_array()[:, ::-1].copy())), "image"),
    (dict(masks=list(quadrant_blobs(64, 2).flip(-1))), "masks"),
    (dict(lr=5e-4), "options lr"),
    (dict(policy="uniform", attention_weight=0.5), "options attention_weight, policy"),
    (dict(comps=build_tiny_components(seed=3)), "model"),
])
def test_resume_refuses_a_checkpoint_of_another_run_naming_what_differs(change, field, tmp_path):
    make_trainer(build_tiny_components(seed=0), tmp_path, steps=2, checkpoint_every=1, keep_checkpoint=True).run("r")
    comps = change.pop("comps", None) or build_tiny_components(seed=0)
    image, masks = change.pop("image", scene()), change.pop("masks", user_masks(2))
    opts = TrainOptions(**{"steps": 4, "checkpoint_every": 1, "refresh_every": 0, "rank": 4, **change})
    trainer = Trainer(comps, image, parse_concepts("cat, dog"), tmp_path, opts, user_masks=masks,
                      class_images=class_imgs(), log=lambda line: None)
    with pytest.raises(AttenCraftError, match=f"belongs to another run: its {field} differ"):
        trainer.resume()


def test_weights_that_become_nan_stop_the_run_and_keep_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    trainer = make_trainer(tiny, tmp_path, steps=4, checkpoint_every=1)
    real_step = trainer.optimizer.step

    def poisoned_step(*args, **kwargs):
        real_step(*args, **kwargs)
        if len(trainer.history) == 2:  # during the third step
            with torch.no_grad():
                trainer.lora[0].fill_(float("nan"))

    monkeypatch.setattr(trainer.optimizer, "step", poisoned_step)
    with pytest.raises(AttenCraftError, match="became NaN or infinite at step 3.*last checkpoint is kept"):
        trainer.run("nan")
    _, info = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert info["step"] == 2 and not (tmp_path / "nan.safetensors").exists()


def test_sample_prediction_models_train_against_the_clean_latents(tmp_path):
    comps = build_tiny_components(prediction_type="sample")
    trainer = make_trainer(comps, tmp_path, steps=1)
    latents = torch.randn(1, 4, 8, 8)
    _, _, target = family_of(comps).training_sample(comps, latents, torch.Generator().manual_seed(0))
    assert torch.equal(target, latents)
    assert np.isfinite(trainer.run("x0").history[0]["loss"])


def test_json_outputs_are_strict(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "r.json", {"fidelity": float("nan")})
    assert not (tmp_path / "r.json").exists()


def test_a_failing_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600


def test_a_later_run_removes_what_a_killed_write_left_and_nothing_else(tmp_path):
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(killed.stdout)
    stale = [tmp_path / ".checkpoint.safetensors.k1ll3d0_.tmp",  # an earlier version's name: no writer's pid
             tmp_path / f".r_lora_kohya.safetensors.{dead}.abcd1234.tmp",
             tmp_path / f".r_loss.png.{dead}.abcd1234.tmp"]
    live = tmp_path / f".r_lora_kohya.safetensors.{os.getpid()}.inflight.tmp"  # a write in progress
    mine = tmp_path / ".r_lora_kohya.safetensors.notes.tmp"  # not a name atomic_write makes
    for path in stale + [live, mine]:
        path.write_bytes(b"half a file")
    make_trainer(build_tiny_components(seed=0), tmp_path, steps=2, checkpoint_every=1, keep_checkpoint=True).run("r")
    assert not any(p.exists() for p in stale) and (tmp_path / "checkpoint.safetensors").is_file()
    assert live.exists() and mine.exists()


def test_two_phase_trains_embeddings_first(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path, steps=3, two_phase=True, phase1_steps=2)
    lora_before, emb_before = trained_state(tiny, trainer)
    for step in range(2):
        trainer.step(step)
    lora_mid, emb_mid = trained_state(tiny, trainer)
    assert all(torch.equal(lora_mid[k], lora_before[k]) for k in lora_before)
    assert not torch.equal(emb_mid, emb_before)
    trainer.step(2)
    lora_after, _ = trained_state(tiny, trainer)
    assert any(not torch.equal(lora_after[k], lora_mid[k]) for k in lora_mid)


def test_v_prediction_models_train(tmp_path):
    comps = build_tiny_components(prediction_type="v_prediction")
    result = make_trainer(comps, tmp_path, steps=2).run("v")
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_mask_refresh_is_logged_and_kept_when_stable(tiny, tmp_path, planted_attention):
    planted_attention(2)
    trainer = make_trainer(tiny, tmp_path, masks="extract", steps=4, refresh_every=2)
    trainer.run("refresh")
    assert any("step 2: masks refreshed (SSIM 1.00, 1.00)" in e for e in trainer.events)
    assert any("sampling ratios" in e for e in trainer.events)


def test_mask_refresh_rejects_changed_masks(tiny, tmp_path, planted_attention):
    planted_attention(2)
    trainer = make_trainer(tiny, tmp_path, masks="user", steps=2, refresh_every=1)
    trainer.masks = torch.roll(trainer.masks, shifts=5, dims=2)  # not what the attention now says
    kept = trainer.masks.clone()
    trainer.refresh_masks(1)
    assert "rejected (SSIM" in trainer.events[-1] and torch.equal(trainer.masks, kept)


def test_class_images_are_generated_once_then_cached(tiny, tmp_path, monkeypatch):
    first = class_images(tiny, "a photo at the beach", 2, 64, steps=2, cache_dir=tmp_path)
    assert len(first) == 2 and first[0].size == (64, 64)
    monkeypatch.setattr("attencraft_core.generation.generate", lambda *a, **k: pytest.fail("regenerated"))
    again = class_images(tiny, "a photo at the beach", 2, 64, steps=2, cache_dir=tmp_path)
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(first, again)] == [True, True]


def test_class_images_of_another_vae_are_not_taken_from_the_cache(tiny, tmp_path):
    class_images(tiny, "a photo at the beach", 1, 64, steps=2, cache_dir=tmp_path)
    other = replace(tiny, vae=copy.deepcopy(tiny.vae))
    with torch.no_grad():
        other.vae.decoder.conv_out.weight.mul_(0.5)
    class_images(other, "a photo at the beach", 1, 64, steps=2, cache_dir=tmp_path)
    assert len(list((tmp_path / "class_images").iterdir())) == 2  # one cache folder per VAE


def test_the_loss_mask_grows_by_its_margin_but_never_into_another_concept(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path)
    trainer.masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    trainer.masks[0, 1, 1] = True  # concept 0: one cell; at 8x8 rows 2-3, columns 2-3
    trainer.masks[1, 1, 2] = True  # concept 1: its right-hand neighbour; at 8x8 rows 2-3, columns 4-5
    plain = torch.zeros(8, 8, dtype=torch.bool)
    plain[2:4, 2:4] = True
    assert torch.equal(trainer.loss_mask([0], (8, 8))[0, 0].bool(), plain)
    both = plain.clone()
    both[2:4, 4:6] = True
    assert torch.equal(trainer.loss_mask([0, 1], (8, 8))[0, 0].bool(), both)

    trainer.opts.loss_mask_margin = 1
    grown = torch.zeros(8, 8, dtype=torch.bool)
    grown[1:5, 1:5] = True
    grown[2:4, 4] = False  # concept 1's pixels stay out of concept 0's loss
    assert torch.equal(trainer.loss_mask([0], (8, 8))[0, 0].bool(), grown)
    grown_both = torch.zeros(8, 8, dtype=torch.bool)
    grown_both[1:5, 1:7] = True
    assert torch.equal(trainer.loss_mask([0, 1], (8, 8))[0, 0].bool(), grown_both)


# ---- bad input -------------------------------------------------------------------------------------------

def test_mask_count_must_match_concepts(tiny, tmp_path):
    with pytest.raises(AttenCraftError, match="Got 3 masks for 2 concepts"):
        Trainer(tiny, scene(), parse_concepts("cat, dog"), tmp_path, TrainOptions(steps=1),
                user_masks=user_masks(3), class_images=class_imgs(), log=lambda s: None)


def test_masks_of_another_size_are_resized_with_a_note(tiny, tmp_path):
    masks = [m[::2, ::2] for m in user_masks(2)]  # 32x32 instead of 16x16 attention size
    trainer = Trainer(tiny, scene(), parse_concepts("cat, dog"), tmp_path, TrainOptions(steps=1),
                      user_masks=masks, class_images=class_imgs(), log=lambda s: None)
    assert trainer.masks.shape == (2, 16, 16) and any("resized" in e for e in trainer.events)


def test_all_zero_mask_is_refused(tiny, tmp_path):
    masks = user_masks(2)
    masks[1] = torch.zeros(64, 64)
    with pytest.raises(AttenCraftError, match="mask for 'dog' \\(mask 2\\) is all black"):
        Trainer(tiny, scene(), parse_concepts("cat, dog"), tmp_path, TrainOptions(steps=1), user_masks=masks,
                class_images=class_imgs(), log=lambda s: None)


def test_concept_file_from_another_family_is_refused(trained_pair):
    result = trained_pair.result
    other = build_tiny_components(text_dim=48)
    with pytest.raises(AttenCraftError, match="trained on a custom-32 model but the model given is custom-48"):
        ConceptSet.load(result.files["concepts"]).apply(other)


def test_prompt_with_an_undefined_placeholder(trained_pair):
    result = trained_pair.result
    with pytest.raises(AttenCraftError, match="uses <c2>, which this concept file does not define"):
        ConceptSet.load(result.files["concepts"]).check_prompt("a photo of <c2> and <c0>")


def test_not_a_concept_file(trained_pair):
    result = trained_pair.result
    with pytest.raises(AttenCraftError, match="not an AttenCraft concept file"):
        ConceptSet.load(result.files["lora_kohya"])


def test_unwritable_output_folder(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AttenCraftError, match="is not writable"):
        make_trainer(tiny, blocker / "out")


def test_steps_below_one(tiny, tmp_path):
    with pytest.raises(AttenCraftError, match="steps must be >= 1 and <= 1000000, got 0"):
        make_trainer(tiny, tmp_path, steps=0)


def test_a_negative_loss_mask_margin_is_refused(tiny, tmp_path):
    with pytest.raises(AttenCraftError, match="loss_mask_margin must be >= 0 and <= 64, got -1"):
        make_trainer(tiny, tmp_path, loss_mask_margin=-1)


def test_a_mask_resolution_other_than_the_training_one_is_refused():
    from attencraft_core.masks import MaskOptions

    with pytest.raises(AttenCraftError, match="not at 128 px: set the training resolution instead"):
        TrainOptions(masks=MaskOptions(resolution=128)).check()
    TrainOptions(resolution=128, masks=MaskOptions(resolution=128)).check()  # what the CLI's --resolution sets
    TrainOptions(masks=MaskOptions(resolution=64)).check(native_resolution=64)  # the model's own size
    with pytest.raises(AttenCraftError, match=r"resolution \(64\), not at 128 px"):
        TrainOptions(masks=MaskOptions(resolution=128)).check(native_resolution=64)


def test_out_of_memory_names_the_options_that_lower_memory(tiny, tmp_path, monkeypatch):
    trainer = make_trainer(tiny, tmp_path)

    def oom(step):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer, "step", oom)
    with pytest.raises(AttenCraftError, match="Out of memory at step 1.*gradient checkpointing, bf16"):
        trainer.run("oom")


# ---- command line ----------------------------------------------------------------------------------------

def test_train_and_generate_commands(tiny_model_dir, scene_png, tmp_path, capsys):
    mask_paths = []
    for i, mask in enumerate(user_masks(2)):
        path = tmp_path / f"m{i}.png"
        Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(path)
        mask_paths.append(str(path))
    cls = tmp_path / "class"
    cls.mkdir()
    class_imgs()[0].save(cls / "0.png")
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--masks", ",".join(mask_paths), "--out", str(out), "--steps", "3", "--rank", "2",
                 "--class-images", str(cls), "--name", "duo"])
    assert code == 0
    assert (out / "duo.safetensors").is_file() and (out / "duo_loss.png").is_file()
    assert re.search(r"training: 100%.*3/3.*loss=", capsys.readouterr().err)  # bar with rate/ETA and the loss
    image = tmp_path / "gen.png"
    code = main(["generate", "--model", str(tiny_model_dir), "--concepts", str(out / "duo.safetensors"),
                 "--prompt", "a photo of <c0> on the beach", "--out", str(image), "--steps", "2"])
    assert code == 0 and Image.open(image).size == (64, 64)
    assert "generating: 100%" in capsys.readouterr().err
    weaker = tmp_path / "weaker.png"
    code = main(["generate", "--model", str(tiny_model_dir), "--concepts", str(out / "duo.safetensors"),
                 "--prompt", "a photo of <c0> on the beach", "--out", str(weaker), "--steps", "2", "--strength", "0"])
    assert code == 0 and not np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(weaker)))
    code = main(["generate", "--model", str(tiny_model_dir), "--concepts", str(out / "duo.safetensors"),
                 "--prompt", "a photo of <c5>", "--out", str(image), "--steps", "2"])
    assert code == 2 and "does not define" in capsys.readouterr().err
    code = main(["train", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--masks", mask_paths[0], "--out", str(out), "--steps", "3", "--class-images", str(cls)])
    assert code == 2 and "Got 1 masks for 2 concepts" in capsys.readouterr().err


def test_snapshots_every_n_steps_keep_the_last_k_and_each_loads(tmp_path):
    (tmp_path / "snap_step000001.safetensors").write_bytes(b"the user's own, named like a snapshot")
    result = make_trainer(build_tiny_components(seed=0), tmp_path, steps=8, save_every=2, keep_last=2).run("snap")
    assert (tmp_path / "snap_step000001.safetensors").read_bytes().startswith(b"the user's own")
    kept = sorted(p.name for p in tmp_path.glob("snap_step*.safetensors") if p.name != "snap_step000001.safetensors")
    assert kept == ["snap_step000004.safetensors", "snap_step000006.safetensors"]  # 2 is dropped; 8 is the final
    assert all(is_snapshot(k) for k in kept) and not is_snapshot("snap.safetensors")
    snapshot = ConceptSet.load(tmp_path / kept[-1])
    assert snapshot.training["steps_done"] == 6 and result.concept_set.training["steps_done"] == 8
    assert not torch.equal(snapshot.embeddings, result.concept_set.embeddings)


def test_previews_show_every_concept_and_leave_training_unchanged(tmp_path):
    plain = build_tiny_components(seed=0)
    reference = make_trainer(plain, tmp_path / "plain", steps=4)
    reference.run("r")
    seen = []
    comps = build_tiny_components(seed=0)
    trainer = make_trainer(comps, tmp_path / "previews", steps=4, preview_every=2,
                           gradient_checkpointing=True)
    trainer.on_preview = lambda step, image: seen.append((step, image.size))
    trainer.run("r")
    assert [s for s, _ in seen] == [2, 4]
    sheets = sorted((tmp_path / "previews").glob("r_preview_*.png"))
    assert [p.name for p in sheets] == ["r_preview_000002.png", "r_preview_000004.png"]
    width, height = seen[0][1]
    assert height > 2 * width - 40  # one labelled row per concept
    for name, value in trained_state(plain, reference)[0].items():
        torch.testing.assert_close(trained_state(comps, trainer)[0][name], value, atol=0, rtol=0)


def test_previews_report_every_sampling_step_and_a_cancel_there_stops_within_one(tmp_path):
    reports = []

    def progress(phase, done, total, **info):
        reports.append((phase, done, total))
        if phase.startswith("preview") and done == 3:
            raise TrainingCancelled()

    trainer = make_trainer(build_tiny_components(seed=0), tmp_path, steps=4, preview_every=2)
    trainer.progress = progress
    with pytest.raises(TrainingCancelled):
        trainer.run("r")
    previews = [(done, total) for phase, done, total in reports if phase == "preview at step 2"]
    assert previews == [(0, 24), (1, 24), (2, 24), (3, 24)]  # 2 concepts x 12 sampling steps, each reported
    assert reports[-1] == ("preview at step 2", 3, 24) and not list(tmp_path.glob("r_preview_*"))
    assert (tmp_path / "checkpoint.safetensors").is_file()  # the cancelled run can resume


def test_class_images_report_every_sampling_step_and_a_cancel_stops_within_one(tiny, tmp_path):
    from attencraft_core.generation import class_images

    reports = []
    class_images(tiny, "a photo at the beach", 2, 64, steps=3, cache_dir=tmp_path,
                 progress=lambda phase, done, total: reports.append((phase, done, total)))
    assert [done for _, done, _ in reports] == [0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 6]
    assert {(phase, total) for phase, _, total in reports} == {("class images", 6)}

    def cancel_at_4(phase, done, total):
        if done == 4:
            raise TrainingCancelled()

    with pytest.raises(TrainingCancelled):
        class_images(tiny, "a photo in the snow", 2, 64, steps=3, cache_dir=tmp_path, progress=cancel_at_4)
    assert len(list((tmp_path / "class_images").rglob("*.png"))) == 2 + 1  # the first snow image, not the second


def test_a_replaced_run_takes_its_snapshots_and_previews_with_it(tmp_path):
    make_trainer(build_tiny_components(seed=0), tmp_path, steps=4, save_every=2, preview_every=2).run("old")
    assert list(tmp_path.glob("old_step*")) and list(tmp_path.glob("old_preview_*"))
    make_trainer(build_tiny_components(seed=0), tmp_path, steps=2).run("new", replace=True)
    assert not list(tmp_path.glob("old*")) and (tmp_path / "new.safetensors").is_file()


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """The recording attention processors stay installed through backward, where checkpointing reruns them."""
    plain, checkpointed = build_tiny_components(seed=0), build_tiny_components(seed=0)
    a = make_trainer(plain, tmp_path / "a", steps=3, refresh_every=2)
    a.run("r")
    b = make_trainer(checkpointed, tmp_path / "b", steps=3, refresh_every=2, gradient_checkpointing=True)
    b.run("r")
    for name, value in trained_state(plain, a)[0].items():
        torch.testing.assert_close(trained_state(checkpointed, b)[0][name], value, atol=1e-6, rtol=1e-5)


def test_a_checkpoint_of_the_previous_format_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "attencraft-checkpoint/2", "info": "{}"})
    with pytest.raises(AttenCraftError, match="earlier version of AttenCraft.*without --resume"):
        load_checkpoint(path)
