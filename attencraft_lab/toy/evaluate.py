"""Measures on the toy world: mask IoU against exact masks, and judge-based concept fidelity and leakage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attencraft_core.api import concepts_prompt

from .judge import analyse
from .world import SIZE, SceneObject


def mask_iou(predicted: np.ndarray, true: np.ndarray) -> float:
    predicted, true = np.asarray(predicted, bool), np.asarray(true, bool)
    union = (predicted | true).sum()
    return float((predicted & true).sum() / union) if union else 0.0


def matches(detection, obj: SceneObject, with_pattern: bool = False) -> bool:
    ok = detection.shape == obj.shape and detection.colour == obj.colour
    return ok and (detection.pattern == obj.pattern if with_pattern else True)


@dataclass
class ImageVerdict:
    shows_target: bool
    leaks_other: bool


def judge_concept_image(image, target: SceneObject, others: list[SceneObject]) -> ImageVerdict:
    """Does an image made for `target` show it, and does it also show another concept's shape or colour?"""
    detections = analyse(image)
    shows = any(matches(d, target) for d in detections)
    leaks = any(d.shape == o.shape or d.colour == o.colour for d in detections for o in others)
    return ImageVerdict(shows, leaks)


def judge_joint_image(image, objects: list[SceneObject]) -> bool:
    """Does an image made for all concepts show every one of them?"""
    detections = analyse(image)
    return all(any(matches(d, o) for d in detections) for o in objects)


# Eight colours and eight shapes, none repeated: up to three scene objects rule out at most six of them.
CONTEXT_PAIRS = (("yellow", "square"), ("red", "circle"), ("blue", "triangle"), ("green", "star"), ("pink", "diamond"),
                 ("purple", "heart"), ("orange", "cross"), ("cyan", "ring"))


def context_object(objects: list[SceneObject]) -> SceneObject:
    """The "new context" a concept is drawn in: a solid pretraining appearance that shares no colour or shape with
    `objects` (so the judge cannot mistake one for the other); its position and size are left to the model."""
    for colour, shape in CONTEXT_PAIRS:
        if all(o.colour != colour and o.shape != shape for o in objects):
            return SceneObject(shape, colour, "solid", SIZE / 2, SIZE / 2, SIZE / 3)
    raise ValueError(f"No context object differs from all of {[o.words() for o in objects]}.")


def context_prompt(placeholder: str, context: SceneObject) -> str:
    """The prompt that draws a concept beside the context object."""
    return concepts_prompt([placeholder, f"a {context.words()}"])


def evaluation_prompts(placeholders: list[str], context: SceneObject | None = None) -> list[str]:
    """The prompts a toy evaluation judges: each concept alone, all of them together, and (given a context object)
    each beside it."""
    prompts = [concepts_prompt([p]) for p in placeholders] + [concepts_prompt(placeholders)]
    return prompts + ([context_prompt(p, context) for p in placeholders] if context is not None else [])


def judge_generations(objects: list[SceneObject], placeholders: list[str], generated: dict[str, list],
                      context: SceneObject | None = None) -> dict:
    """Fidelity and leakage per concept, joint fidelity and (given `context`) context fidelity per concept, of the
    images `generated` for each of `evaluation_prompts(placeholders, context)`; placeholder i stands for objects[i].

    Fidelity: share of a concept's images that show it; leakage: share that also show another concept's shape or
    colour; joint: share of the together-images that show every concept; context: share of the images beside the
    context object that show both."""
    prompts = evaluation_prompts(placeholders, context)
    n = len(placeholders)
    fidelity, leakage, in_context = [], [], []
    for i, obj in enumerate(objects):
        others = objects[:i] + objects[i + 1:]
        verdicts = [judge_concept_image(im, obj, others) for im in generated[prompts[i]]]
        fidelity.append(float(np.mean([v.shows_target for v in verdicts])))
        leakage.append(float(np.mean([v.leaks_other for v in verdicts])))
        if context is not None:
            in_context.append(float(np.mean([judge_joint_image(im, [obj, context])
                                             for im in generated[prompts[n + 1 + i]]])))
    joint = float(np.mean([judge_joint_image(im, objects) for im in generated[prompts[n]]]))
    return {"fidelity": fidelity, "leakage": leakage, "joint": joint, "context": in_context}
