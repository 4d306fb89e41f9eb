"""The demo: masks -> training -> generations of each concept alone, together and in a new context, on the
shipped toy model and a bundled scene (or on any SD model and image), with one contact sheet and a report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .concepts import parse_concepts
from .errors import AttenCraftError
from .outputs import ensure_out_dir, save_image, write_json
from .progress import Progress, no_progress
from .validation import require_number, require_seed

EXAMPLE_SCENE = Path(__file__).resolve().parents[1] / "examples" / "toy_scene.json"


def load_scene(path: Path = EXAMPLE_SCENE):
    """The bundled toy scene (rendered, so its exact masks are known) and its concept words."""
    from .toy.world import SceneObject, render

    spec = json.loads(Path(path).read_text())
    scene = render(spec["background"], [SceneObject(**o) for o in spec["objects"]])
    return scene, spec["concepts"]


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], tile: int = 128) -> Image.Image:
    """Labelled rows of images, each image scaled to `tile` px."""
    columns = max(len(images) for _, images in rows)
    label = 16
    sheet = Image.new("RGB", (columns * tile, len(rows) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, images) in enumerate(rows):
        y = r * (tile + label)
        draw.text((4, y + 2), title, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (c * tile, y + label))
    return sheet


def run_demo(out_dir, model_dir=None, image_path=None, concepts: str | None = None, steps: int | None = None,
             images_per_prompt: int = 4, seed: int = 0, log=print, progress: Progress = no_progress) -> dict:
    """Masks, training and generations in `out_dir`; returns the report (also written as report.json).
    `log` takes one line per stage; `progress` is told every long phase (see attencraft_core.progress)."""
    from .images import load_image, mask_to_image, overlay
    from .masks import MaskOptions, extract_masks
    from .model_loading import load_components
    from .generation import generate
    from .training import Trainer, TrainOptions

    if steps is not None:
        require_number("Training steps", steps, 1, None, integer=True)
    require_number("Images per prompt", images_per_prompt, 1, 100, integer=True)
    require_seed("Seed", seed)
    started = time.perf_counter()
    out = ensure_out_dir(out_dir)
    toy = image_path is None  # the bundled toy scene, on the shipped toy model unless --model names another
    scene = None
    if toy:
        from .toy.model import toy_model_dir
        model_dir = model_dir or toy_model_dir()
        if not (Path(model_dir) / "unet").is_dir():
            raise AttenCraftError(f"The toy model is not in {model_dir}; train it with "
                                  "`python -m attencraft_core.toy.train --export attencraft_core/toy/weights`, "
                                  "or pass --model, --image and --concepts.")
        scene, default_concepts = load_scene()
        image, notes = scene.image, []
        concepts = concepts or default_concepts
    elif model_dir is None or not concepts:
        raise AttenCraftError("With --image, also give --model and --concepts (or give neither for the toy demo).")
    else:
        image, notes = load_image(image_path)
    concept_list = parse_concepts(concepts)
    comps = load_components(model_dir, progress=progress)
    log(f"extracting masks for {', '.join(c.word for c in concept_list)}")
    result = extract_masks(comps, image, concept_list, MaskOptions(seed=seed), progress=progress)
    report: dict = {"model": str(model_dir), "concepts": [{"word": c.word, "placeholder": c.placeholder}
                                                          for c in concept_list], "notes": notes}
    if scene is not None:
        from .toy.evaluate import mask_iou
        report["mask_iou"] = [round(mask_iou(m.numpy(), t), 4) for m, t in zip(result.masks, scene.masks)]
        log(f"mask IoU against the exact masks: {report['mask_iou']}")
    if toy:
        from .toy.model import concept_training_options
        opts = concept_training_options(steps, seed=seed)
    else:
        opts = TrainOptions(seed=seed) if steps is None else TrainOptions(steps=steps, seed=seed)
    steps = opts.steps
    log(f"training {steps} steps")
    trainer = Trainer(comps, image, concept_list, out / "run", opts, cache_dir=out / "cache", log=log,
                      progress=progress)
    trained = trainer.run("demo")
    report["final_loss"] = round(trained.history[-1]["loss"], 5)
    report["mask_events"] = trained.events

    from .toy.evaluate import context_object, evaluation_prompts
    placeholders = [c.placeholder for c in concept_list]
    context = context_object(scene.objects) if toy else None
    prompts = evaluation_prompts(placeholders, context)
    if not toy:
        prompts += [f"a photo of {p} on the beach" for p in placeholders]
    rows = [("input | overlay | masks", [image, overlay(image, result.masks)]
             + [mask_to_image(m) for m in result.masks])]
    generated = {}
    for k, prompt in enumerate(prompts, 1):
        images = generate(comps, [prompt] * images_per_prompt, seed=seed + 1000, steps=25, cfg=5.0,
                          progress=lambda phase, done, total: progress(f"images {k}/{len(prompts)}", done, total))
        generated[prompt] = images
        rows.append((prompt, images))
    save_image(out / "contact_sheet.png", contact_sheet(rows, tile=128 if toy else 256))
    if scene is not None:
        report.update(toy_metrics(scene, placeholders, generated, context))
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "report.json", report)
    log(f"wrote {out / 'contact_sheet.png'} and {out / 'report.json'} in {report['seconds']} s")
    return report


def toy_metrics(scene, placeholders: list[str], generated: dict, context) -> dict:
    """The report's judge-based metrics (`toy.evaluate.judge_generations`) of the demo's images, rounded."""
    from .toy.evaluate import judge_generations

    judged = judge_generations(scene.objects, placeholders, generated, context)
    per_concept = [{"placeholder": p, "fidelity": round(f, 3), "leakage": round(k, 3), "context_fidelity": round(c, 3)}
                   for p, f, k, c in zip(placeholders, judged["fidelity"], judged["leakage"], judged["context"])]
    return {"per_concept": per_concept, "joint_fidelity": round(judged["joint"], 3),
            "fidelity_gap": round(max(judged["fidelity"]) - min(judged["fidelity"]), 3)}
