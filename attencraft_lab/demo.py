"""The demo on the embedded default: the shipped toy model and the bundled toy scene, run through the core's
demo, then measured against the scene's exact masks and judged (mask IoU, fidelity, leakage, joint and context
fidelity) in report.json."""

from __future__ import annotations

import json
from pathlib import Path

from attencraft_core.api import (AttenCraftError, Progress, check_demo_settings, load_components, no_progress,
                                  require_number, run_demo, write_json)

from .toy.evaluate import context_object, evaluation_prompts, judge_generations, mask_iou
from .toy.model import concept_training_options, toy_model_dir
from .toy.world import SceneObject, render

EXAMPLE_SCENE = Path(__file__).resolve().parents[1] / "examples" / "toy_scene.json"


def load_scene(path: Path = EXAMPLE_SCENE):
    """The bundled toy scene (rendered, so its exact masks are known) and its concept words."""
    spec = json.loads(Path(path).read_text())
    scene = render(spec["background"], [SceneObject(**o) for o in spec["objects"]])
    return scene, spec["concepts"]


def toy_metrics(scene, placeholders: list[str], generated: dict, context) -> dict:
    """The report's judge-based metrics (`toy.evaluate.judge_generations`) of the demo's images, rounded."""
    judged = judge_generations(scene.objects, placeholders, generated, context)
    per_concept = [{"placeholder": p, "fidelity": round(f, 3), "leakage": round(k, 3), "context_fidelity": round(c, 3)}
                   for p, f, k, c in zip(placeholders, judged["fidelity"], judged["leakage"], judged["context"])]
    return {"per_concept": per_concept, "joint_fidelity": round(judged["joint"], 3),
            "fidelity_gap": round(max(judged["fidelity"]) - min(judged["fidelity"]), 3)}


def run_toy_demo(out_dir, steps: int | None = None, images_per_prompt: int = 4, seed: int = 0,
                 model_dir: str | Path | None = None, log=print, progress: Progress = no_progress) -> dict:
    """The core's demo on the bundled scene with the toy's training settings; returns the report with the toy
    world's metrics (also written to report.json)."""
    if steps is not None:
        require_number("Training setting steps", steps, 1, None, integer=True)
    check_demo_settings(images_per_prompt, seed)
    model_dir = Path(model_dir or toy_model_dir())
    if not (model_dir / "unet").is_dir():
        raise AttenCraftError(f"The toy model is not in {model_dir}; train it with `python -m "
                              "attencraft_lab.toy.train --export attencraft_lab/toy/weights`.")
    scene, words = load_scene()
    comps = load_components(model_dir, progress=progress)
    options = concept_training_options(steps, seed=seed)
    placeholders = [f"<c{i}>" for i in range(len(words.split(",")))]
    context = context_object(scene.objects)
    result = run_demo(out_dir, comps, scene.image, words, options, evaluation_prompts(placeholders, context),
                      images_per_prompt, seed, tile=128, log=log, progress=progress)
    report = dict(result.report)
    report["mask_iou"] = [round(mask_iou(m.numpy(), t), 4) for m, t in zip(result.masks.masks, scene.masks)]
    log(f"mask IoU against the exact masks: {report['mask_iou']}")
    report.update(toy_metrics(scene, placeholders, result.generated, context))
    write_json(Path(out_dir) / "report.json", report)
    return report
