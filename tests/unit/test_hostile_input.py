"""Hostile and nonsense input: each case ends in one clear error (exit status 2, the setting named), never a
traceback and never a silently wrong result. A table: command-line arguments, expected message."""

import errno
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from attencraft_core import AttenCraftError
from attencraft_core.checkpoint import FORMAT as CHECKPOINT_FORMAT
from attencraft_core.checkpoint import load_checkpoint, save_checkpoint
from attencraft_core.cli import main
from attencraft_core.concept_file import FORMAT as CONCEPT_FORMAT
from attencraft_core.concept_file import ConceptSet
from attencraft_core.concepts import Concept
from attencraft_core.outputs import atomic_write, safe_name
from attencraft_lab.__main__ import main as lab_main
from helpers import quadrant_blobs

TRAIN = [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr=-1e-4"], "lr must be >= 1e-09 and <= 1"),
    (["--lr", "1e-320"], "lr must be >= 1e-09 and <= 1"),
    (["--embedding-lr", "inf"], "embedding_lr must be a finite number"),
    (["--weight-decay", "-0.1"], "weight_decay must be >= 0"),
    (["--attention-weight", "-1"], "attention_weight must be >= 0"),
    (["--prior-weight", "nan"], "prior_weight must be a finite number"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--checkpoint-every", "0"], "checkpoint_every must be >= 1"),
    (["--class-steps", "0"], "class_steps must be >= 1"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--rank", "100000"], "rank must be >= 1 and <= 1024"),
    (["--rank", "0"], "rank must be >= 1 and <= 1024"),
    (["--seed", str(2 ** 64)], "seed must be >= 0"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--mask-seed", str(2 ** 63)], "Mask setting seed must be >= 0"),
    (["--resolution", "100"], "resolution must be a multiple of 8"),
    (["--resolution", "-64"], "resolution must be >= 8"),
    (["--resolution", "1000000"], "resolution must be >= 8 and <= 8192"),
    (["--ssim-min", "2"], "ssim_min must be >= -1 and <= 1"),
    (["--threshold", "nan"], "threshold must be a finite number"),
    (["--phase1-lr", "0", "--two-phase"], "phase1_lr must be >= 1e-09"),
]

GENERATE = [
    (["--steps", "0"], "Sampling steps must be >= 1"),
    (["--count", "0"], "Image count must be >= 1"),
    (["--cfg", "nan"], "Guidance scale (cfg) must be a finite number"),
    (["--cfg", "-1"], "Guidance scale (cfg) must be >= 0"),
    (["--strength", "nan"], "LoRA strength must be a finite number"),
    (["--seed", str(2 ** 63)], "Seed must be >= 0"),
    (["--seed", str(2 ** 63 - 1), "--count", "2"], "Last seed (seed + count - 1) must be >= 0"),
    (["--resolution", "60"], "Resolution must be a multiple of 8"),
]

DEMO = [
    (["--steps", "0"], "steps must be >= 1"),
    (["--images", "0"], "Images per prompt must be >= 1"),
    (["--images", "-1"], "Images per prompt must be >= 1"),
    (["--seed", "-5"], "Seed must be >= 0"),
]


def check_refused(argv, expected, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # progress bars may precede it
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize("extra,expected", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_train_refuses_nonsense_numbers(extra, expected, tiny_model_dir, scene_png, tmp_path, capsys):
    out = tmp_path / "run"
    check_refused(["train", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                   "--out", str(out), *extra], expected, capsys)
    assert not out.exists() or not any(out.iterdir()), "a refused run wrote files"


@pytest.mark.parametrize("extra,expected", GENERATE, ids=[" ".join(a) for a, _ in GENERATE])
def test_generate_refuses_nonsense_numbers(extra, expected, tmp_path, capsys):
    # refused before the model or the concept set is read: neither needs to exist
    check_refused(["generate", "--model", str(tmp_path / "no_model"), "--concepts", str(tmp_path / "none.safetensors"),
                   "--prompt", "a photo of <c0>", "--out", str(tmp_path / "x.png"), *extra], expected, capsys)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra,expected", DEMO, ids=[" ".join(a) for a, _ in DEMO])
def test_demo_refuses_nonsense_numbers(extra, expected, tmp_path, capsys):
    """Both demos: the toy one of the measuring world and the core's on a model and image."""
    code = lab_main(["demo", "--out", str(tmp_path / "demo"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    check_refused(["demo", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "i.png"), "--concepts", "a,b",
                   "--out", str(tmp_path / "demo"), *extra], expected, capsys)
    assert not (tmp_path / "demo").exists()


# ---- files from outside: concept sets, checkpoints, images, model folders -------------------------------------

def concept_set_parts():
    """A valid concept set's metadata and tensors (made, not trained), to corrupt one thing at a time."""
    concepts = [Concept("cat", "<c0>"), Concept("dog", "<c1>")]
    lora = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.randn(4, 32),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.randn(32, 4)}
    meta = {"format": CONCEPT_FORMAT, "concepts": json.dumps([{"word": c.word, "placeholder": c.placeholder}
                                                              for c in concepts]),
            "base_family": "custom-32", "base_model": "", "lora_rank": "4", "lora_alpha": "4.0",
            "lora_targets": "kv", "training": "{}"}
    tensors = {**{f"lora.{k}": v for k, v in lora.items()}, "embedding.<c0>": torch.randn(32),
               "embedding.<c1>": torch.randn(32)}
    return meta, tensors


def nan_row(tensors):
    tensors["embedding.<c1>"] = torch.full((32,), float("nan"))


CONCEPT_FILES = [
    ("concepts not JSON", lambda m, t: m.update(concepts="[{oops"), "metadata is not valid JSON"),
    ("no concepts", lambda m, t: m.pop("concepts"), "metadata has no 'concepts'"),
    ("concepts a dict", lambda m, t: m.update(concepts='{"a": 1}'), "'concepts' must be a list"),
    ("placeholder not <cN>", lambda m, t: m.update(concepts='[{"word": "x", "placeholder": "x"}]'),
     "'concepts' must be a list"),
    ("duplicate placeholder", lambda m, t: m.update(
        concepts='[{"word": "a", "placeholder": "<c0>"}, {"word": "b", "placeholder": "<c0>"}]'), "share a placeholder"),
    ("rank as text", lambda m, t: m.update(lora_rank="sixteen"), "are not numbers"),
    ("rank huge", lambda m, t: m.update(lora_rank="100000"), "out of range"),
    ("alpha nan", lambda m, t: m.update(lora_alpha="nan"), "out of range"),
    ("unknown targets", lambda m, t: m.update(lora_targets="everything"), "unknown LoRA targets"),
    ("training not JSON", lambda m, t: m.update(training="{"), "metadata is not valid JSON"),
    ("missing embedding row", lambda m, t: t.pop("embedding.<c1>"), "embedding of <c1> is missing"),
    ("embedding a matrix", lambda m, t: t.update({"embedding.<c0>": torch.randn(2, 32)}), "embedding of <c0>"),
    ("embeddings of two sizes", lambda m, t: t.update({"embedding.<c0>": torch.randn(16)}), "differ in size"),
    ("NaN embedding", lambda m, t: nan_row(t), "NaN or infinite"),
    ("no LoRA", lambda m, t: [t.pop(k) for k in list(t) if k.startswith("lora.")], "no LoRA weights"),
    ("LoRA of another rank", lambda m, t: t.update({k: torch.randn(8, 32) for k in t if "lora_A" in k}),
     "not rank 4"),
    ("LoRA without its B", lambda m, t: [t.pop(k) for k in list(t) if "lora_B" in k], "no lora_B partner"),
    ("masks of two shapes", lambda m, t: t.update({"mask.<c0>": torch.ones(4, 4, dtype=torch.uint8),
                                                   "mask.<c1>": torch.ones(5, 4, dtype=torch.uint8)}),
     "masks differ in shape"),
]


@pytest.mark.parametrize("case,corrupt,expected", CONCEPT_FILES, ids=[c for c, _, _ in CONCEPT_FILES])
def test_damaged_concept_sets_are_refused_with_the_reason(case, corrupt, expected, tmp_path, capsys):
    meta, tensors = concept_set_parts()
    corrupt(meta, tensors)
    path = tmp_path / "set.safetensors"
    save_file(tensors, str(path), metadata=meta)
    check_refused(["generate", "--model", str(tmp_path / "no_model"), "--concepts", str(path), "--prompt",
                   "a photo of <c0>", "--out", str(tmp_path / "x.png")], expected, capsys)


def test_a_valid_made_concept_set_loads():
    """The corruption table above starts from a set that loads, so each case fails for its own reason."""
    meta, tensors = concept_set_parts()
    loaded = ConceptSet.from_parts("set", meta, tensors)
    assert loaded.rank == 4 and loaded.embeddings.shape == (2, 32) and len(loaded.lora) == 2


@pytest.mark.parametrize("content,expected", [
    (b"", "too short to be a safetensors file"),
    ((2 ** 40).to_bytes(8, "little") + b"{}", "declares a 1099511627776 byte header"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "Cannot read"),
])
def test_files_that_are_not_safetensors_are_refused(content, expected, tmp_path, capsys):
    path = tmp_path / "set.safetensors"
    path.write_bytes(content)
    check_refused(["generate", "--model", str(tmp_path / "m"), "--concepts", str(path), "--prompt", "a <c0>",
                   "--out", str(tmp_path / "x.png")], expected, capsys)


def train_args(model, scene, masks, out, *extra):
    return ["train", "--model", str(model), "--image", str(scene), "--concepts", "cat,dog", "--masks",
            ",".join(map(str, masks)), "--out", str(out), "--steps", "2", "--rank", "2", "--prior-weight", "0",
            "--quiet", *extra]


@pytest.fixture
def mask_pngs(tmp_path):
    paths = []
    for i, blob in enumerate(quadrant_blobs(64, 2)):
        paths.append(tmp_path / f"m{i}.png")
        Image.fromarray((blob.numpy() * 255).astype(np.uint8)).save(paths[-1])
    return paths


def foreign_info(path):
    tensors, info = load_checkpoint(path)
    info["concepts"] = ["<c0>=bird", "<c1>=fish"]
    save_checkpoint(path, tensors, info)


def empty_info(path):
    tensors, _ = load_checkpoint(path)
    save_file(tensors, str(path), metadata={"format": CHECKPOINT_FORMAT, "info": "[]"})


def wrong_shapes(path):
    tensors, info = load_checkpoint(path)
    tensors["embeddings"] = torch.zeros(5, 3)
    save_checkpoint(path, tensors, info)


def edit_checkpoint(info_changes=None, tensor_changes=None):
    def damage(path):
        tensors, info = load_checkpoint(path)
        info.update(info_changes or {})
        tensors.update(tensor_changes or {})
        save_checkpoint(path, tensors, info)
    return damage


def empty_masks(path):
    tensors, info = load_checkpoint(path)
    tensors["masks"] = torch.zeros_like(tensors["masks"])
    save_checkpoint(path, tensors, info)


def saved_lr(path):
    tensors, info = load_checkpoint(path)
    for group in info["optimizer"]["param_groups"]:
        group["lr"] = 100.0
    save_checkpoint(path, tensors, info)


CHECKPOINTS = [
    ("empty", lambda p: p.write_bytes(b""), "not a readable AttenCraft checkpoint"),
    ("negative step", edit_checkpoint({"step": -2}), "its step -2 is not a step count"),
    ("step past --steps", edit_checkpoint({"step": 6}), "past the 4 steps asked: raise steps to at least 6"),
    ("history not a list", edit_checkpoint({"history": "xyz"}), "history is not a list of 2 steps"),
    ("history of another run", edit_checkpoint({"history": [{"step": 1, "loss": 0.1, "concepts": [7]}] * 2}),
     "history entry 1 is not a training step"),
    ("scores of another shape", edit_checkpoint(tensor_changes={"scores": torch.ones(5)}),
     "attention scores are not 2 numbers"),
    ("empty masks", empty_masks, "mask of concept 0 is empty"),
    ("optimizer state of another shape", edit_checkpoint(tensor_changes={"optimizer.0.exp_avg": torch.ones(3)}),
     "optimizer state optimizer.0.exp_avg of shape (3,)"),
    ("sampler scores of another length", edit_checkpoint({"sampler": {"rng": [3, [], None], "scores": [1.0]}}),
     "sampler state does not fit"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable AttenCraft checkpoint"),
    ("a foreign safetensors", lambda p: save_file({"x": torch.ones(2)}, str(p)), "is not an AttenCraft checkpoint"),
    ("state not an object", empty_info, "not a JSON object"),
    ("another run's concepts", foreign_info, "belongs to another run"),
    ("embeddings of another shape", wrong_shapes, "does not fit this run"),
]


@pytest.mark.parametrize("case,damage,expected", CHECKPOINTS, ids=[c for c, _, _ in CHECKPOINTS])
def test_resume_refuses_a_damaged_or_foreign_checkpoint(case, damage, expected, tiny_model_dir, scene_png,
                                                        mask_pngs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--checkpoint-every", "1", "--keep-checkpoint")) == 0
    damage(out / "checkpoint.safetensors")
    capsys.readouterr()
    check_refused(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--resume", "--steps", "4"), expected, capsys)


def test_settings_saved_in_a_checkpoint_never_override_the_runs(tiny_model_dir, scene_png, mask_pngs, tmp_path):
    """A learning rate of 100 written into a checkpoint's optimizer state: the resumed run still trains at its own
    --lr, exactly as the undamaged checkpoint resumes."""
    finals = []
    for damage in (None, saved_lr):
        out = tmp_path / ("damaged" if damage else "clean")
        assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--checkpoint-every", "1",
                               "--keep-checkpoint")) == 0
        if damage:
            damage(out / "checkpoint.safetensors")
        assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--resume", "--steps", "4")) == 0
        finals.append(ConceptSet.load(out / "attencraft.safetensors"))
    assert all(torch.equal(finals[0].lora[k], finals[1].lora[k]) for k in finals[0].lora)
    assert finals[1].training["steps_done"] == 4


def bomb(path):
    Image.new("1", (20_000, 20_000)).save(path, format="PNG")  # small on disk, 400 M pixels decoded


IMAGES = [
    ("decompression bomb", bomb, "at most 8192 px on each side"),
    ("truncated PPM", lambda p: p.write_bytes(b"P6\n64 64\n255\n" + b"\x80" * 100), "Cannot read"),
    ("malformed GIF", lambda p: p.write_bytes(b"GIF89a\x40\x00\x40\x00\xf7\x00\x00" + b"\x01" * 40), "image"),
    ("not an image", lambda p: p.write_bytes(b"hello"), "Cannot read"),
    ("a folder", lambda p: p.mkdir(), "is a folder, not a regular file"),
]


@pytest.mark.parametrize("case,make,expected", IMAGES, ids=[c for c, _, _ in IMAGES])
def test_hostile_images_are_refused_before_any_model_work(case, make, expected, tmp_path, capsys):
    image = tmp_path / "in.img"
    make(image)
    check_refused(["masks", "--model", str(tmp_path / "no_model"), "--image", str(image), "--concepts", "a,b",
                   "--out", str(tmp_path / "out")], expected, capsys)


def sdxl_config(folder):
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (folder / "unet" / "config.json").write_text(json.dumps(config))


def nan_weights(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(path))


def swapped_weights(folder):
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors",
                folder / "vae" / "diffusion_pytorch_model.safetensors")


def renamed_weight(folder):
    path = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("final_layer_norm.weight"))
    tensors[key.replace(".weight", ".gamma")] = tensors.pop(key)
    save_file(tensors, str(path))


MODELS = [
    ("SDXL UNet without its second text encoder", sdxl_config, "an SDXL UNet needs text_encoder_2"),
    ("a weight named otherwise", renamed_weight, "the text_encoder weight file does not match its config.json: "
                                                 "1 missing (e.g. final_layer_norm.weight), 1 unexpected"),
    ("NaN weights", nan_weights, "conv_in.weight holds NaN"),
    ("swapped weight files", swapped_weights, "the vae weight file does not match its config.json: 124 missing"),
]


@pytest.mark.parametrize("case,damage,expected", MODELS, ids=[c for c, _, _ in MODELS])
def test_broken_model_folders_are_refused_at_load(case, damage, expected, tiny_model_dir, scene_png, tmp_path,
                                                  capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    check_refused(["masks", "--model", str(folder), "--image", str(scene_png), "--concepts", "cat,dog", "--out",
                   str(tmp_path / "out")], expected, capsys)
    assert len(capsys.readouterr().err) < 2000  # no page of library warnings


# ---- options and paths -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,expected", [("bogus", "is not a device name"), ("cuda:7", "is not available")])
def test_devices_that_do_not_exist_are_refused(device, expected, tiny_model_dir, scene_png, tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    check_refused(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                   "--out", str(tmp_path / "out"), "--device", device], expected, capsys)


def test_a_rank_wider_than_the_layers_is_refused_before_allocating(tiny_model_dir, scene_png, mask_pngs, tmp_path,
                                                                    capsys):
    check_refused(train_args(tiny_model_dir, scene_png, mask_pngs, tmp_path / "run", "--rank", "1024"),
                  "larger than the narrowest layer", capsys)


def test_an_affinity_larger_than_free_memory_is_refused_before_allocating(monkeypatch, tiny_model_dir, scene_png,
                                                                          tmp_path, capsys):
    monkeypatch.setattr("attencraft_core.masks.free_memory", lambda device: 1024)
    check_refused(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                   "--out", str(tmp_path / "out")], "self-attention affinity", capsys)


def test_long_words_give_short_distinct_file_names():
    a, b = safe_name("x" * 300 + " one"), safe_name("x" * 300 + " two")
    assert len(a) <= 64 and len(b) <= 64 and a != b and safe_name("cat") == "cat"


@pytest.mark.parametrize("where", ["out", "class-images", "cache"])
def test_a_file_in_the_way_of_a_folder_is_one_clear_error(where, tiny_model_dir, scene_png, mask_pngs, tmp_path,
                                                          capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    args = train_args(tiny_model_dir, scene_png, mask_pngs, blocker if where == "out" else tmp_path / "run")
    if where == "class-images":
        args += ["--prior-weight", "1", "--class-images", str(blocker)]
    if where == "cache":
        args += ["--prior-weight", "1", "--num-class-images", "1", "--class-steps", "1", "--cache-dir",
                 str(blocker)]
    expected = {"out": "is not writable", "class-images": "is not a folder", "cache": "is not writable"}[where]
    check_refused(args, expected, capsys)


def test_disk_full_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"the last good checkpoint")

    def disk_full(tmp):
        tmp.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AttenCraftError, match="No space left on device in .*Any previous version of the file .* is kept"):
        atomic_write(target, disk_full)
    assert target.read_bytes() == b"the last good checkpoint" and list(tmp_path.iterdir()) == [target]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only): a real disk that fills up."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_training_keeps_the_last_good_checkpoint(small_disk, tiny_model_dir, scene_png, mask_pngs,
                                                                     capsys):
    out = small_disk / "run"
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--steps", "1", "--keep-checkpoint")) == 0
    good = (out / "checkpoint.safetensors").read_bytes()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - len(good) // 2))  # room for half a checkpoint
    capsys.readouterr()
    check_refused(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--resume", "--steps", "3",
                             "--checkpoint-every", "1"), f"No space left on device in {out}", capsys)
    assert (out / "checkpoint.safetensors").read_bytes() == good
    assert load_checkpoint(out / "checkpoint.safetensors")[1]["step"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_write_that_runs_out_of_room_names_the_folder_and_the_space(monkeypatch, tmp_path):
    """The same without a tmpfs: safetensors reports the full disk as its own error type."""
    from safetensors import SafetensorError

    from attencraft_core.outputs import save_safetensors

    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"the last good checkpoint")

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(AttenCraftError, match=rf"No space left on device in {tmp_path} to write checkpoint.safetensors "
                                              r"\(about 0.0 MB needed, [\d.]+ MB free\)"):
        save_safetensors(target, {"x": torch.ones(4)})
    assert target.read_bytes() == b"the last good checkpoint" and list(tmp_path.iterdir()) == [target]


def test_a_damaged_class_image_cache_file_is_named(tiny, tmp_path):
    from attencraft_core.generation import class_images

    class_images(tiny, "a photo at the beach", 1, 64, steps=1, cache_dir=tmp_path)
    cached = next((tmp_path / "class_images").rglob("0000.png"))
    cached.write_bytes(b"not a png any more")
    with pytest.raises(AttenCraftError, match="0000.png"):
        class_images(tiny, "a photo at the beach", 1, 64, steps=1, cache_dir=tmp_path)


@pytest.mark.parametrize("value,expected", [("100", "multiple of 8"), ("0", ">= 8")])
def test_masks_refuse_bad_resolutions(value, expected, tiny_model_dir, scene_png, tmp_path, capsys):
    check_refused(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                   "--out", str(tmp_path / "out"), "--resolution", value], expected, capsys)



# ---- silent wrong results that are now refused or handled -------------------------------------------------------

def test_a_placeholder_as_a_concept_word_is_refused(tiny_model_dir, scene_png, tmp_path, capsys):
    check_refused(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "<c1>, dog",
                   "--out", str(tmp_path / "out")], "<c1> is a placeholder name", capsys)


def test_masks_of_any_size_and_paths_with_commas_are_taken(tiny_model_dir, scene_png, tmp_path, capsys):
    folder = tmp_path / "masks, final"
    folder.mkdir()
    paths = []
    for i in range(2):  # 17 px wide, 300 tall: the first concept in the top half, the second in the bottom one
        mask = np.zeros((300, 17), np.uint8)
        mask[150 * i: 150 * (i + 1)] = 255
        paths.append(folder / f"m{i}.png")
        Image.fromarray(mask).save(paths[-1])
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--masks", *map(str, paths), "--out", str(out), "--steps", "1", "--rank", "2", "--prior-weight",
                 "0", "--quiet"]) == 0, capsys.readouterr().err
    log = json.loads((out / "attencraft_train.json").read_text())
    assert any("was 17x300; resized" in e for e in log["events"])


def test_a_second_run_in_a_folder_needs_overwrite(tiny_model_dir, scene_png, mask_pngs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out)) == 0
    check_refused(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--lr", "2e-4"),
                  "holds another training run's files", capsys)
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--lr", "2e-4", "--overwrite")) == 0


# ---- nothing lost: replacing a run deletes only the files a run wrote ------------------------------------------

def test_overwrite_deletes_only_the_files_a_run_wrote(tiny_model_dir, scene_png, mask_pngs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--steps", "1")) == 0
    written = json.loads((out / "attencraft_files.json").read_text())["files"]
    assert "attencraft.safetensors" in written and "attencraft_c0.safetensors" in written
    # the user's own files, named as a run's outputs would be
    (out / "attencraft_cat_photos_lora.safetensors").write_bytes(b"my lora")
    (out / "attencraft_mask_notes.png").write_bytes(b"my notes")
    (out / "attencraft_c9.safetensors").write_bytes(b"mine too")
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--steps", "1", "--overwrite",
                           "--name", "other")) == 0
    for mine, content in [("attencraft_cat_photos_lora.safetensors", b"my lora"),
                          ("attencraft_mask_notes.png", b"my notes"), ("attencraft_c9.safetensors", b"mine too")]:
        assert (out / mine).read_bytes() == content
    assert not (out / "attencraft.safetensors").exists() and (out / "other.safetensors").is_file()
    log = json.loads((out / "other_train.json").read_text())
    kept = [e for e in log["events"] if e.startswith("kept ")]
    assert kept and "attencraft_cat_photos_lora.safetensors" in kept[0] and "attencraft_mask_notes.png" in kept[0]
    assert set(json.loads((out / "attencraft_files.json").read_text())["files"]) == {
        p.name for p in out.iterdir() if p.name.startswith("other")}


def test_a_manifest_entry_with_a_path_is_never_followed(tiny_model_dir, scene_png, mask_pngs, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--steps", "1")) == 0
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    manifest = json.loads((out / "attencraft_files.json").read_text())
    manifest["files"] += ["../precious.txt", str(outside), ".."]
    (out / "attencraft_files.json").write_text(json.dumps(manifest))
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--steps", "1", "--overwrite")) == 0
    assert outside.read_text() == "keep me"


# ---- nothing hung: special files are refused by name -----------------------------------------------------------

@pytest.mark.parametrize("where", ["out", "checkpoint", "concept set", "image", "model"])
def test_a_fifo_is_refused_by_name_never_opened(where, tiny_model_dir, scene_png, mask_pngs, tmp_path, capsys):
    import os
    out = tmp_path / "run"
    out.mkdir()
    args = train_args(tiny_model_dir, scene_png, mask_pngs, out, "--steps", "1")
    expected = "is a FIFO (named pipe), not a regular file"
    if where == "out":  # a FIFO among a folder's files is not a run's file: the run goes ahead
        os.mkfifo(out / "notes.safetensors")
        expected = None
    elif where == "checkpoint":
        os.mkfifo(out / "checkpoint.safetensors")
        args += ["--resume"]
    elif where == "concept set":
        os.mkfifo(tmp_path / "set.safetensors")
        args = ["generate", "--model", str(tiny_model_dir), "--concepts", str(tmp_path / "set.safetensors"),
                "--prompt", "a <c0>", "--out", str(tmp_path / "x.png")]
    elif where == "image":
        os.mkfifo(tmp_path / "in.png")
        args = train_args(tiny_model_dir, tmp_path / "in.png", mask_pngs, out)
    else:
        model = tmp_path / "model"
        shutil.copytree(tiny_model_dir, model)
        (model / "unet" / "config.json").rename(model / "unet" / "real.json")
        os.mkfifo(model / "unet" / "config.json")
        args = train_args(model, scene_png, mask_pngs, out)
    if expected is None:
        assert main(args) == 0, capsys.readouterr().err
        assert (out / "notes.safetensors").exists()
    else:
        check_refused(args, expected, capsys)


# ---- the model's own sizes and constants are checked -----------------------------------------------------------

def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


BROKEN_CONFIGS = [
    ("sample_size huge", "unet/config.json", {"sample_size": 100000}, "native resolution"),
    ("sample_size 0", "unet/config.json", {"sample_size": 0}, "native resolution"),
    ("sample_size 8192 px", "unet/config.json", {"sample_size": 4096}, "must be >= 8 and <= 4096, got 8192"),
    ("beta_end NaN", "scheduler/scheduler_config.json", {"beta_end": float("nan")}, "beta_end"),
    ("beta_end above 1", "scheduler/scheduler_config.json", {"beta_end": 5.0}, "noise levels outside"),
    ("VAE scaling NaN", "vae/config.json", {"scaling_factor": float("nan")}, "scaling_factor"),
    ("VAE scaling 0", "vae/config.json", {"scaling_factor": 0}, "scaling_factor"),
    ("timesteps 0", "scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps"),
]


@pytest.mark.parametrize("case,file,changes,expected", BROKEN_CONFIGS, ids=[c[0] for c in BROKEN_CONFIGS])
def test_broken_model_constants_are_named_not_blamed_on_the_concepts(case, file, changes, expected, tiny_model_dir,
                                                                     scene_png, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    edit_json(folder / file, **changes)
    check_refused(["masks", "--model", str(folder), "--image", str(scene_png), "--concepts", "cat,dog", "--out",
                   str(tmp_path / "out")], expected, capsys)


@pytest.mark.parametrize("content", ["[1]", "7", '"text"'])
def test_a_model_json_that_is_not_an_object_is_named(content, tiny_model_dir, scene_png, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model_index.json").write_text(content)
    check_refused(["masks", "--model", str(folder), "--image", str(scene_png), "--concepts", "cat,dog", "--out",
                   str(tmp_path / "out")], "model_index.json holds a JSON", capsys)


# ---- concept sets: values a trained set never holds ------------------------------------------------------------

LOADED_VALUES = [
    ("float8 embedding", lambda m, t: t.update({"embedding.<c0>": torch.randn(32).to(torch.float8_e4m3fn)}), None),
    ("alpha 1e30", lambda m, t: m.update(lora_alpha="1e30"), "alpha 1e+30 out of range"),
    ("embedding of 1e30", lambda m, t: t.update({"embedding.<c1>": torch.full((32,), 1e30)}),
     "embedding.<c1> holds a value of 1e+30"),
    ("LoRA of 1e30", lambda m, t: t.update({k: torch.full_like(v, 1e30) for k, v in t.items() if "lora_B" in k}),
     "holds a value of 1e+30"),
    ("float8 NaN embedding", lambda m, t: t.update(
        {"embedding.<c0>": torch.full((32,), float("nan")).to(torch.float8_e4m3fn)}), "NaN or infinite"),
]


@pytest.mark.parametrize("case,corrupt,expected", LOADED_VALUES, ids=[c for c, _, _ in LOADED_VALUES])
def test_concept_set_values_are_bounded_where_a_set_is_read(case, corrupt, expected, tmp_path):
    meta, tensors = concept_set_parts()
    corrupt(meta, tensors)
    path = tmp_path / "set.safetensors"
    save_file(tensors, str(path), metadata=meta)
    if expected is None:  # a storage dtype is read (widened), not a crash
        assert ConceptSet.load(path).embeddings.dtype == torch.float32
    else:
        with pytest.raises(AttenCraftError, match=expected.replace("+", r"\+")):
            ConceptSet.load(path)


# ---- masks -----------------------------------------------------------------------------------------------------

def rgba_mask(path, box):
    """White everywhere, opaque only inside `box`: a mask painted on a transparent layer."""
    array = np.full((64, 64, 4), 255, np.uint8)
    array[..., 3] = 0
    array[box[0]:box[1], box[2]:box[3], 3] = 255
    Image.fromarray(array, "RGBA").save(path)


def test_a_mask_painted_on_a_transparent_layer_counts_where_it_is_opaque(tiny_model_dir, scene_png, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    rgba_mask(paths[0], (0, 32, 0, 32))
    rgba_mask(paths[1], (32, 64, 32, 64))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--masks", *map(str, paths), "--out", str(out), "--steps", "1", "--rank", "2", "--prior-weight",
                 "0", "--quiet"]) == 0
    saved = ConceptSet.load(out / "attencraft.safetensors").masks.float()
    assert 0.2 < saved[0].mean() < 0.3 and saved[0][: saved.shape[1] // 2, : saved.shape[2] // 2].all()
    assert not (saved[0] & saved[1].bool()).any() if saved.dtype == torch.bool else not (saved[0] * saved[1]).any()


@pytest.mark.parametrize("masks,expected", [
    (["white", "white"], "covers the whole image"),
    (["left", "left"], "cover the same pixels (100% overlap)"),
])
def test_masks_that_leave_no_region_of_their_own_are_refused(masks, expected, tiny_model_dir, scene_png, tmp_path,
                                                             capsys):
    paths = []
    for i, kind in enumerate(masks):
        array = np.zeros((64, 64), np.uint8)
        array[:, : 64 if kind == "white" else 30] = 255
        paths.append(tmp_path / f"m{i}.png")
        Image.fromarray(array).save(paths[-1])
    check_refused(train_args(tiny_model_dir, scene_png, paths, tmp_path / "run"), expected, capsys)


def test_a_nan_mask_from_a_node_is_refused(tiny):
    from attencraft_core.training import prepare_user_masks
    from attencraft_core.concepts import parse_concepts

    masks = [torch.ones(64, 64), torch.full((64, 64), float("nan"))]
    masks[0][:, 32:] = 0
    with pytest.raises(AttenCraftError, match="mask for 'dog' \\(mask 2\\) is not a finite 2-D mask"):
        prepare_user_masks(masks, parse_concepts("cat, dog"), (16, 16))


# ---- leftovers and paths ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["masks", "train", "generate"])
def test_an_empty_out_is_refused_not_the_current_folder(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = {"masks": ["masks", "--image", "i.png", "--concepts", "a,b"],
            "train": ["train", "--image", "i.png", "--concepts", "a,b"],
            "generate": ["generate", "--concepts", "c.safetensors", "--prompt", "a <c0>"]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--model", "m", "--out", ""])
    assert exit_.value.code == 2 and "--out: is empty" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def saved_set(tmp_path_factory, tiny_model_dir):
    import io
    from contextlib import redirect_stderr

    from helpers import scene_image
    folder = tmp_path_factory.mktemp("saved_set")
    scene_image().save(folder / "scene.png")
    masks = []
    for i, blob in enumerate(quadrant_blobs(64, 2)):
        masks.append(folder / f"m{i}.png")
        Image.fromarray((blob.numpy() * 255).astype(np.uint8)).save(masks[-1])
    with redirect_stderr(io.StringIO()):
        assert main(train_args(tiny_model_dir, folder / "scene.png", masks, folder / "run", "--steps", "1")) == 0
    return folder / "run" / "attencraft.safetensors"


def generate_args(model, concept_set, out, *extra):
    return ["generate", "--model", str(model), "--concepts", str(concept_set), "--prompt", "a photo of <c0>",
            "--out", str(out), "--steps", "2", "--resolution", "64", "--quiet", *extra]


@pytest.mark.parametrize("suffix,magic", [(".jpg", b"\xff\xd8\xff"), (".jpeg", b"\xff\xd8\xff"),
                                          (".webp", b"RIFF"), (".png", b"\x89PNG")])
def test_generate_writes_the_format_its_suffix_names(suffix, magic, saved_set, tiny_model_dir, tmp_path):
    out = tmp_path / f"x{suffix}"
    assert main(generate_args(tiny_model_dir, saved_set, out)) == 0
    assert out.read_bytes().startswith(magic)


def test_generate_refuses_an_unknown_suffix_before_any_work(saved_set, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(generate_args(tiny_model_dir, saved_set, tmp_path / "x.gif"))
    assert exit_.value.code == 2 and "writes images as .png, .jpg, .jpeg, .webp" in capsys.readouterr().err


def test_generate_expands_home_in_out(saved_set, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(generate_args(tiny_model_dir, saved_set, "~/g.png")) == 0
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")


def test_generate_refuses_a_negative_prompt_it_would_cut(saved_set, tiny_model_dir, tmp_path, capsys):
    code = main(generate_args(tiny_model_dir, saved_set, tmp_path / "x.png", "--negative", "blurry " * 1000))
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"^error: The negative prompt is \d+ tokens long but the text encoder takes at "
                                   r"most 77 .*, and the rest would be cut: .*Shorten the negative prompt", err), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_a_run_folder_of_an_earlier_version_without_a_manifest(tiny_model_dir, scene_png, mask_pngs, tmp_path,
                                                               capsys):
    """Still seen as in use; replacing it deletes nothing it cannot prove a run wrote (the new run's files take
    the same names), and names what it kept."""
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--steps", "1")) == 0
    (out / "attencraft_files.json").unlink()
    (out / "attencraft_mask_notes.png").write_bytes(b"my notes")
    capsys.readouterr()
    check_refused(train_args(tiny_model_dir, scene_png, mask_pngs, out), "holds another training run's files", capsys)
    assert main(train_args(tiny_model_dir, scene_png, mask_pngs, out, "--overwrite")) == 0
    assert (out / "attencraft_mask_notes.png").read_bytes() == b"my notes"
    assert ConceptSet.load(out / "attencraft.safetensors").training["steps_done"] == 2
    events = json.loads((out / "attencraft_train.json").read_text())["events"]
    assert any(e.startswith("kept ") and "attencraft_mask_notes.png" in e for e in events), events


def test_the_command_line_prints_only_the_packs_own_lines(saved_set, tiny_model_dir, tmp_path):
    """No library notice (transformers' torchvision fallback, printed when a pipeline is imported) among the
    pack's own lines."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "attencraft_core", *generate_args(tiny_model_dir, saved_set,
                                                                                 tmp_path / "g.png")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout == f"wrote {tmp_path / 'g.png'}\n", run.stdout


def test_an_image_size_the_vae_cannot_hold_is_refused_before_allocating(monkeypatch, tiny_model_dir, scene_png,
                                                                        tmp_path, capsys):
    monkeypatch.setattr("attencraft_core.encoding.free_memory", lambda device: 1024)
    check_refused(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                   "--out", str(tmp_path / "out")], "The VAE needs about", capsys)
