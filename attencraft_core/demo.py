"""The whole job on one model and image: masks -> training -> generations of each concept alone, together and
in new contexts, written as one contact sheet and a report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from PIL import Image

from .concepts import Concept, concepts_prompt, parse_concepts
from .generation import generate
from .images import contact_sheet, mask_to_image, overlay
from .masks import MaskOptions, MaskResult, extract_masks
from .model_loading import SDComponents
from .outputs import ensure_out_dir, save_image, write_json
from .progress import Progress, no_progress
from .training import Trainer, TrainOptions, TrainResult
from .validation import require_number, require_seed


@dataclass
class DemoResult:
    """What run_demo made; `report` is also written as report.json."""

    masks: MaskResult
    trained: TrainResult
    generated: dict[str, list[Image.Image]]
    report: dict = field(default_factory=dict)


def demo_prompts(placeholders: list[str]) -> list[str]:
    """Each concept alone, all together, and each in a new context."""
    return ([concepts_prompt([p]) for p in placeholders] + [concepts_prompt(placeholders)]
            + [concepts_prompt([p], "a photo of {} on the beach") for p in placeholders])


def check_demo_settings(images_per_prompt: int, seed: int) -> None:
    """Refuse out-of-range demo settings before any model work."""
    require_number("Images per prompt", images_per_prompt, 1, 100, integer=True)
    require_seed("Seed", seed)


def run_demo(out_dir, comps: SDComponents, image: Image.Image, concepts: str | list[Concept],
             options: TrainOptions | None = None, prompts: list[str] | None = None, images_per_prompt: int = 4,
             seed: int = 0, tile: int = 256, log=print, progress: Progress = no_progress) -> DemoResult:
    """Masks, training and generations in `out_dir` (contact_sheet.png, report.json, run/ with the trained set).

    `prompts` default to demo_prompts; generation uses seed + 1000, 25 steps, guidance 5. `log` takes one line
    per stage; `progress` is told every long phase (see attencraft_core.progress).
    """
    check_demo_settings(images_per_prompt, seed)
    options = options or TrainOptions(seed=seed)
    options.check(comps.native_resolution)
    concept_list = parse_concepts(concepts) if isinstance(concepts, str) else concepts
    started = time.perf_counter()
    out = ensure_out_dir(out_dir)
    log(f"extracting masks for {', '.join(c.word for c in concept_list)}")
    masks = extract_masks(comps, image, concept_list, MaskOptions(seed=seed), progress=progress)
    log(f"training {options.steps} steps")
    trained = Trainer(comps, image, concept_list, out / "run", options, cache_dir=out / "cache", log=log,
                      progress=progress).run("demo", replace=True)  # the demo's own run folder
    prompts = prompts or demo_prompts([c.placeholder for c in concept_list])
    rows = [("input | overlay | masks", [image, overlay(image, masks.masks)] + [mask_to_image(m) for m in masks.masks])]
    generated = {}
    for k, prompt in enumerate(prompts, 1):
        generated[prompt] = generate(comps, [prompt] * images_per_prompt, seed=seed + 1000, steps=25, cfg=5.0,
                                     progress=lambda phase, done, total: progress(f"images {k}/{len(prompts)}",
                                                                                  done, total))
        rows.append((prompt, generated[prompt]))
    save_image(out / "contact_sheet.png", contact_sheet(rows, tile=tile))
    report = {"model": comps.source, "concepts": [{"word": c.word, "placeholder": c.placeholder}
                                                  for c in concept_list],
              "masks": masks.summary(), "final_loss": round(trained.history[-1]["loss"], 5),
              "mask_events": trained.events, "prompts": prompts, "seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "report.json", report)
    log(f"wrote {out / 'contact_sheet.png'} and {out / 'report.json'} in {report['seconds']} s")
    return DemoResult(masks, trained, generated, report)

