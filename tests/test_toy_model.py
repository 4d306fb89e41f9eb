"""The shipped toy model: loads offline, draws what a caption asks, finds objects, and runs the demo."""

import json
import random

import numpy as np
import pytest
import torch

from attencraft_core import parse_concepts
from attencraft_core.demo import run_demo
from attencraft_core.generation import generate
from attencraft_core.masks import MaskOptions, extract_masks
from attencraft_core.model_loading import load_components
from attencraft_core.toy.evaluate import mask_iou
from attencraft_core.toy.judge import analyse
from attencraft_core.toy.model import toy_model_dir
from attencraft_core.toy.world import random_scene


@pytest.fixture(scope="module")
def toy():
    return load_components(toy_model_dir())


def test_loads_with_stable_diffusion_pipeline_offline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_model_dir(), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_generates_what_the_caption_asks(toy):
    images = generate(toy, ["a photo of a red circle"] * 4, seed=0, steps=20, cfg=5.0)
    found = [any(d.shape == "circle" and d.colour == "red" for d in analyse(im)) for im in images]
    assert sum(found) >= 2, f"the judge found a red circle in {sum(found)} of 4 images"


def test_mask_iou_stays_above_the_floor(toy):
    ious = []
    for i in range(4):
        scene = random_scene(random.Random(2000 + i), count=2, held_out=True)
        words = ", ".join(o.shape for o in scene.objects)
        try:
            result = extract_masks(toy, scene.image, parse_concepts(words), MaskOptions(seed=0))
            ious += [mask_iou(m.numpy(), t) for m, t in zip(result.masks, scene.masks)]
        except Exception:
            ious += [0.0, 0.0]
    assert np.mean(ious) >= 0.3, f"mean mask IoU {np.mean(ious):.3f}"


def test_demo_runs_end_to_end(tmp_path):
    report = run_demo(tmp_path, steps=3, images_per_prompt=1, log=lambda s: None)
    assert (tmp_path / "contact_sheet.png").is_file()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["mask_iou"] == report["mask_iou"] and len(saved["per_concept"]) == 2
    assert 0 <= saved["joint_fidelity"] <= 1
