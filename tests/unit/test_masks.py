"""Mask extraction on the tiny model, the `masks` command, and its bad inputs."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from attencraft_core import AttenCraftError, parse_concepts
from attencraft_core.cli import main
from attencraft_core.concepts import add_concept_tokens
from attencraft_core.images import load_image
from attencraft_core import mask_math
from attencraft_core.masks import MaskOptions, MaskResult, extract_masks, masks_from_latents, upsample_masks
from attencraft_core.model_loading import load_components
from helpers import two_object_array

WORDS = ["cat", "dog", "bird", "ball"]


def run_pipeline(tiny, n, seed=0):
    concepts = parse_concepts(WORDS[:n])
    add_concept_tokens(tiny.tokenizer, tiny.text_encoder, concepts)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    return masks_from_latents(tiny, latents, concepts, MaskOptions(seed=seed), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_pipeline_finds_each_concept_where_its_token_attends(tiny, planted_attention, n):
    blobs = planted_attention(n)
    before = {k: v.clone() for k, v in tiny.denoiser.state_dict().items()}
    result = run_pipeline(tiny, n)
    assert result.masks_lowres.shape == (n, 16, 16) and result.masks_lowres.dtype == torch.bool
    assert result.maps.shape == result.token_attention.shape == (n + 1, 16, 16)
    for k in range(n):
        iou = (result.masks_lowres[k] & blobs[k]).sum() / (result.masks_lowres[k] | blobs[k]).sum()
        assert iou > 0.9, f"concept {k}: IoU {iou:.2f} with the blob its token attends to"
    assert 0 <= result.timestep < 300
    assert bool((result.scores > 0.5).all()) and bool((result.scores <= 1).all())
    assert all(torch.equal(v, tiny.denoiser.state_dict()[k]) for k, v in before.items())  # no parameter update


def test_random_attention_either_separates_or_says_why(tiny):
    """On a random model the outcome is luck; it must be a valid result or the readable ambiguity error."""
    for seed in range(3):
        try:
            result = run_pipeline(tiny, 3, seed)
        except AttenCraftError as exc:
            assert "--seed" in str(exc) and "--threshold" in str(exc)
        else:
            assert int(result.masks_lowres.sum(0).max()) == 1 and bool(result.masks_lowres.flatten(1).any(1).all())


def test_same_seed_same_timestep_and_maps(tiny, planted_attention):
    planted_attention(2)
    a, b = run_pipeline(tiny, 2, seed=5), run_pipeline(tiny, 2, seed=5)
    assert a.timestep == b.timestep and torch.equal(a.maps, b.maps)
    assert run_pipeline(tiny, 2, seed=6).timestep != a.timestep


def test_extract_masks_returns_image_size_masks(tiny, planted_attention):
    planted_attention(2)
    image = Image.fromarray(two_object_array(96)[:, :80])  # 80x96, not square
    result = extract_masks(tiny, image, parse_concepts("cat, dog"), MaskOptions())
    assert result.masks.shape == (2, 96, 80)
    # upsampled masks agree with the low-resolution ones where both are defined
    low = torch.nn.functional.interpolate(result.masks.float()[None], size=(16, 16), mode="area")[0]
    assert float(((low > 0.5) == result.masks_lowres).float().mean()) > 0.8


def test_cli_writes_masks_overlay_and_json(tiny_model_dir, scene_png, tmp_path, capsys, planted_attention):
    blobs = planted_attention(2)
    out = tmp_path / "out"
    code = main(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "masks.json").read_text())
    assert [c["placeholder"] for c in summary["concepts"]] == ["<c0>", "<c1>"]
    for c in summary["concepts"]:
        mask = np.asarray(Image.open(out / c["mask_file"]))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert abs((mask > 0).mean() - c["mask_fraction"]) < 0.05
        assert 0 <= c["score"] <= 1
    first = np.asarray(Image.open(out / summary["concepts"][0]["mask_file"])) > 0
    assert first[10:20, 10:20].all() and not first[40:, 40:].any()  # blob 0 is top-left
    assert abs(first.mean() - float(blobs[0].float().mean())) < 0.05
    assert Image.open(out / "overlay.png").size == (64, 64)
    printed = capsys.readouterr()
    assert "overlay:" in printed.out and "confidence" in printed.out
    assert all(c["confidence"]["level"] in ("high", "low") for c in summary["concepts"])
    # progress of each long phase on stderr (tqdm: phase name, count, ETA); nothing of it with --quiet
    assert "loading tiny_model" in printed.err and "masks: 100%" in printed.err and "3/3" in printed.err
    code = main(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--out", str(tmp_path / "quiet"), "--quiet"])
    quiet = capsys.readouterr()
    assert code == 0 and "masks:" not in quiet.err and "loading" not in quiet.err and "Loading" not in quiet.err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["masks", "--help"])
    text = capsys.readouterr().out
    for option in ["--model", "--image", "--concepts", "--out", "--seed", "--t-min", "--t-max", "--threshold",
                   "--affinity-power", "--cross-factor", "--self-factor", "--resolution", "--device", "--precision"]:
        assert option in text


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, note", [("RGBA", "transparency"), ("L", "was L"), ("P", "was P")])
def test_non_rgb_images_are_converted_with_a_note(tmp_path, mode, note):
    path = tmp_path / "img.png"
    Image.fromarray(two_object_array()).convert(mode).save(path)
    image, notes = load_image(path)
    assert image.mode == "RGB" and any(note in n for n in notes)


def test_unreadable_missing_and_small_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(AttenCraftError, match="Cannot read .* as an image"):
        load_image(bad)
    with pytest.raises(AttenCraftError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 100)).save(small)
    with pytest.raises(AttenCraftError, match="32x100 px; AttenCraft needs at least 64 px"):
        load_image(small)


def test_model_folder_errors(tiny_model_dir, tmp_path):
    with pytest.raises(AttenCraftError, match="does not exist"):
        load_components(tmp_path / "missing")
    single = tmp_path / "sd_xl_base_1.0.safetensors"
    single.write_bytes(b"{}")
    with pytest.raises(AttenCraftError, match="single-file checkpoint.*save_pretrained.*Load Checkpoint"):
        load_components(single)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(AttenCraftError, match="missing vae"):
        load_components(partial)
    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    with pytest.raises(AttenCraftError, match="Flux model folder .* is missing vae, text_encoder, tokenizer, "
                                              "text_encoder_2, tokenizer_2, scheduler"):
        load_components(flux)
    (flux / "text_encoder_3").mkdir()
    with pytest.raises(AttenCraftError, match="Stable Diffusion 3 model"):
        load_components(flux)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(AttenCraftError, match="is a KandinskyPipeline model; AttenCraft supports"):
        load_components(other)


def test_cli_reports_errors_without_traceback(tiny_model_dir, scene_png, tmp_path, capsys):
    code = main(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: AttenCraft needs at least two concepts")
    assert "Traceback" not in err
    code = main(["masks", "--model", str(tiny_model_dir), "--image", str(scene_png), "--concepts", "cat,dog",
                 "--out", str(tmp_path / "o"), "--t-min", "300", "--t-max", "100"])
    assert code == 2 and "Timestep range" in capsys.readouterr().err


def constructed_result(maps, lowres, words=("cat", "dog")):
    concepts = parse_concepts(list(words))
    n = len(concepts)
    return MaskResult(concepts, lowres, maps, maps, torch.ones(n), 0, torch.ones(n), [True] * n)


def test_upsampled_masks_keep_a_region_the_finer_rule_loses():
    """Concept 1 owns one attention pixel whose map is a narrow spike: interpolated, it never beats the
    background by the margin, so the finer rule leaves it empty; its attention-resolution region is kept."""
    maps = torch.zeros(3, 8, 8)
    maps[0] = 0.6                        # background everywhere
    maps[1, :, :4], maps[0, :, :4] = 1.0, 0.0  # concept 0: the left half, clearly
    maps[2, 5, 6] = 0.75                 # concept 1: one pixel, 0.15 above the background there
    lowres = torch.stack([maps[1] > 0.5, torch.zeros(8, 8, dtype=torch.bool)])
    lowres[1, 5, 6] = True
    result = constructed_result(maps, lowres)
    masks = upsample_masks(result, (32, 32), threshold=0.1)
    assert masks[1].any() and masks[1][20:24, 24:28].all() and int(masks[1].sum()) == 16
    assert not (masks[0] & masks[1]).any() and masks[0][:, :16].all()
    assert "attention-resolution region" in result.notes[0]
    covered = constructed_result(maps, lowres)
    covered.masks_lowres = torch.stack([torch.ones(8, 8, dtype=torch.bool), lowres[1]])
    maps_all = maps.clone()
    maps_all[1], maps_all[0] = 1.0, 0.0  # concept 0's finer mask takes every pixel
    covered.maps = maps_all
    with pytest.raises(AttenCraftError, match="'dog' vanishes at the image's size"):
        upsample_masks(covered, (32, 32), threshold=0.1)


def test_confidence_is_low_for_a_tiny_region_or_a_token_that_attends_elsewhere():
    labels = torch.zeros(10, 10, dtype=torch.long)
    labels[:, :5] = 1
    labels[0, 9] = 2  # concept 1: one pixel of 100, under SMALL_REGION
    attention = torch.stack([(labels == 1).float(), (labels == 2).float() * 0.9])
    assignment = mask_math.assign_regions(labels, attention, ["cat", "dog"])
    margins, strongest = mask_math.assignment_confidence(assignment)
    assert strongest == [True, True] and torch.allclose(margins, torch.tensor([1.0, 0.9]))
    masks = torch.stack([labels == 1, labels == 2])
    result = constructed_result(torch.zeros(3, 10, 10), masks)
    result.margins, result.strongest = margins, strongest
    assert result.confidence(0)["level"] == "high" and result.confidence(1)["level"] == "low"
    result.strongest = [False, True]
    assert result.confidence(0)["level"] == "low"

