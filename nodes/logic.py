"""What the ComfyUI nodes do, as plain functions over the core (testable without ComfyUI).

ComfyUI's IMAGE is a float tensor [B, H, W, C] in [0, 1]; MASK is [B, H, W] in [0, 1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..attencraft_core.api import (AttenCraftError, Concept, ConceptSet, MaskOptions, concepts_prompt, ensure_rgb,
                                   extract_masks, overlay, parse_concepts)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")


@dataclass
class ExtractedConcepts:
    """The ATTENCRAFT_CONCEPTS value: what Extract Concept Masks hands to the trainer."""

    concepts: list[Concept]
    masks: torch.Tensor   # [N, H, W] float 0/1 at the image's size
    scores: list[float]
    notes: list[str]


@dataclass
class TrainedConcepts:
    """The ATTENCRAFT_CONCEPT_SET value: a concept set and the name its files were written under."""

    concept_set: ConceptSet
    name: str


def image_from_comfy(image: torch.Tensor) -> tuple[Image.Image, list[str]]:
    """The first image of a ComfyUI IMAGE batch as RGB PIL (alpha flattened), with notes."""
    if image is None or image.ndim != 4 or image.shape[0] == 0:
        raise AttenCraftError("No image: connect a Load Image node to the image input.")
    notes = [f"the IMAGE batch has {image.shape[0]} images; the first one is used."] if image.shape[0] > 1 else []
    array = (image[0].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(array.shape[-1])
    if mode is None:
        raise AttenCraftError(f"The image has {array.shape[-1]} channels; expected 1, 3 or 4.")
    pil, more = ensure_rgb(Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode), "the image")
    return pil, notes + more


def image_to_comfy(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def images_from_comfy(batch: torch.Tensor | None) -> list[Image.Image] | None:
    """Every image of an optional IMAGE batch as RGB PIL (for prior images)."""
    if batch is None:
        return None
    return [image_from_comfy(batch[i:i + 1])[0] for i in range(batch.shape[0])]


def extract(comps, image: torch.Tensor, words: str, seed: int, t_min: int, t_max: int, threshold: float):
    """Extract Concept Masks: (MASK [N, H, W], overlay IMAGE [1, H, W, 3], ExtractedConcepts)."""
    concepts = parse_concepts(words)
    pil, notes = image_from_comfy(image)
    result = extract_masks(comps, pil, concepts, MaskOptions(seed=seed, t_min=t_min, t_max=t_max,
                                                             threshold=threshold))
    masks = result.masks.float()
    value = ExtractedConcepts(concepts, masks, [round(float(s), 6) for s in result.scores], notes + result.notes)
    return masks, image_to_comfy(overlay(pil, result.masks)), value


def training_inputs(extracted: ExtractedConcepts | None, masks: torch.Tensor | None,
                    words: str) -> tuple[list[Concept], list[torch.Tensor]]:
    """Concepts and per-concept masks from Extract Concept Masks, or from user MASKs plus words."""
    if extracted is not None:
        return extracted.concepts, list(extracted.masks)
    if masks is None or not words.strip():
        raise AttenCraftError("Connect the concepts output of Extract Concept Masks, or give masks (one per "
                              "concept) and the concept words (e.g. \"cat, dog\").")
    concepts = parse_concepts(words)
    masks = masks if masks.ndim == 3 else masks[None]
    return concepts, [m.float().cpu() for m in masks]


def check_name(name: str) -> str:
    """A file name for the outputs; refuses anything that could leave the output folder."""
    name = (name or "").strip()
    if not NAME_RE.match(name) or ".." in name:
        raise AttenCraftError(f"Name {name!r} is not allowed: use 1-64 letters, digits, spaces, '-', '_' or '.', "
                              "starting with a letter or digit, with no '/', '\\\\' or '..'.")
    return name


def comfy_file_paths(name: str, loras_dir: str | Path, embeddings_dir: str | Path, sets_dir: str | Path,
                     count: int) -> dict[str, Path]:
    """Where the trainer's files go inside ComfyUI's model folders."""
    name = check_name(name)
    paths = {"lora": Path(loras_dir) / "attencraft" / f"{name}.safetensors",
             "concept_set": Path(sets_dir) / f"{name}.safetensors"}
    for i in range(count):
        paths[f"c{i}"] = Path(embeddings_dir) / f"{name}_c{i}.safetensors"
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    return paths


def write_comfy_files(concept_set: ConceptSet, paths: dict[str, Path]) -> dict[str, Path]:
    """The kohya LoRA, one embedding per concept and the concept set, atomically."""
    concept_set.save_kohya(paths["lora"])
    for i in range(len(concept_set.concepts)):
        concept_set.save_embedding(i, paths[f"c{i}"])
    concept_set.save(paths["concept_set"])
    return paths


def embedding_names(name: str, count: int) -> list[str]:
    return [f"{name}_c{i}" for i in range(count)]


def prompt_syntax(concept_set: ConceptSet, name: str) -> str:
    """How to write each concept in CLIP Text Encode, with example prompts."""
    names = embedding_names(name, len(concept_set.concepts))
    lines = [f"{c.placeholder} ({c.word}): embedding:{n}" for c, n in zip(concept_set.concepts, names)]
    lines.append("")
    lines += [concepts_prompt([f"embedding:{n}"], "a photo of {} on the beach") for n in names]
    lines.append(concepts_prompt([f"embedding:{n}" for n in names]))
    lines.append("(put a space or the start of the prompt before each embedding:, not a comma)")
    return "\n".join(lines)


def check_lora_keys(kohya: dict[str, torch.Tensor], key_map: dict[str, str]) -> None:
    """Every LoRA module must map onto a model weight (ComfyUI would otherwise skip it with a warning)."""
    bases = {k.split(".")[0] for k in kohya}
    missing = sorted(b for b in bases if b not in key_map)
    if missing:
        raise AttenCraftError(f"{len(missing)} LoRA layers do not match this MODEL (e.g. {missing[0]}): "
                              "the concept set was trained on another base model.")
