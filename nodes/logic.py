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

from ..attencraft_core.api import (PLACEHOLDER_RE, AttenCraftError, Concept, ConceptSet, MaskOptions, Progress,
                                   concepts_prompt, earlier_run_files, ensure_rgb, extract_masks, no_progress, overlay,
                                   parse_concepts, safe_name)

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


def image_from_comfy(image: torch.Tensor, what: str = "image") -> tuple[Image.Image, list[str]]:
    """The first image of a ComfyUI IMAGE batch as RGB PIL (alpha flattened), with notes; `what` names the input."""
    if image is None or image.ndim != 4 or image.shape[0] == 0:
        raise AttenCraftError(f"No image: connect a Load Image node to the {what} input.")
    if not torch.isfinite(image[0]).all():
        raise AttenCraftError(f"The {what} input holds NaN or infinite pixel values: check the node that makes it "
                              "(an image must be numbers from 0 to 1).")
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
    return [image_from_comfy(batch[i:i + 1], "prior_images")[0] for i in range(batch.shape[0])]


def extract(comps, image: torch.Tensor, words: str, opts: MaskOptions, progress: Progress = no_progress):
    """Extract Concept Masks: (MASK [N, H, W], overlay IMAGE [1, H, W, 3], ExtractedConcepts)."""
    concepts = parse_concepts(words)
    pil, notes = image_from_comfy(image)
    result = extract_masks(comps, pil, concepts, opts, progress)
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


EMBEDDINGS_SUBFOLDER = "attencraft"


def comfy_file_paths(name: str, loras_dir: str | Path, sets_dir: str | Path) -> dict[str, Path]:
    """Where a trained set's LoRA and concept set go inside ComfyUI's model folders."""
    name = check_name(name)
    paths = {"lora": Path(loras_dir) / "attencraft" / f"{name}.safetensors",
             "concept_set": Path(sets_dir) / f"{name}.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    return paths


def write_comfy_files(concept_set: ConceptSet, paths: dict[str, Path]) -> dict[str, Path]:
    """The LoRA and the concept set, atomically (the embeddings: write_embeddings)."""
    concept_set.save_lora(paths["lora"])
    concept_set.save(paths["concept_set"])
    return paths


def embedding_names(concept_set: ConceptSet, name: str) -> list[str]:
    """The names CLIP Text Encode knows each concept by: attencraft/<name>_<content hash>_c<i>. The hash makes
    two sets (or two trainings under one name) never share a name, so no prompt reads stale embeddings."""
    stem = f"{EMBEDDINGS_SUBFOLDER}/{safe_name(name)}_{concept_set.content_hash()}"
    return [f"{stem}_c{i}" for i in range(len(concept_set.concepts))]


def write_embeddings(concept_set: ConceptSet, name: str, embeddings_dir: str | Path) -> list[str]:
    """Write (atomically, every time) one embedding file per concept; returns their names for prompts."""
    names = embedding_names(concept_set, name)
    (Path(embeddings_dir) / EMBEDDINGS_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    for i, embedding in enumerate(names):
        concept_set.save_embedding(i, Path(embeddings_dir) / f"{embedding}.safetensors")
    return names


def fill_prompt(text: str, concept_set: ConceptSet, names: list[str]) -> str:
    """`text` with each <cN> replaced by embedding:<name of concept N> (a space is put before it where
    ComfyUI's tokenizer needs one). Unknown placeholders are an error naming the defined ones."""
    concept_set.check_prompt(text)
    by_placeholder = dict(zip(concept_set.placeholders, names))

    def replace(match: re.Match) -> str:
        before = match.string[match.start() - 1] if match.start() else " "
        return ("" if before.isspace() or before == "(" else " ") + f"embedding:{by_placeholder[match.group(0)]}"

    return PLACEHOLDER_RE.sub(replace, text)



def together_prompt(concept_set: ConceptSet, names: list[str]) -> str:
    """A usable prompt line with every concept: "a photo of embedding:... and embedding:..."."""
    return fill_prompt(concepts_prompt(concept_set.placeholders), concept_set, names)


def prompt_syntax(concept_set: ConceptSet, names: list[str]) -> str:
    """What the node shows: each concept's embedding name, and how to write prompts with them."""
    lines = [f"{c.placeholder} = {c.word}: embedding:{n}" for c, n in zip(concept_set.concepts, names)]
    lines += ["", "prompt output: " + together_prompt(concept_set, names),
              "AttenCraft Concept Prompt turns <c0>, <c1>... into these names; or type embedding:<name> yourself "
              "(after a space, not a comma)."]
    return "\n".join(lines)


def training_plan(name: str, sets_dir: str | Path, resume: bool, overwrite: bool) -> tuple[str, list[str]]:
    """What Train does with `name`: "new", "resume" or "replace", with notes. A name in use (a finished set or
    a stopped run) needs resume or overwrite; nothing is replaced silently."""
    sets_dir = Path(sets_dir)
    final, run_dir = sets_dir / f"{name}.safetensors", sets_dir / f"{name}_run"
    checkpoint = run_dir / "checkpoint.safetensors"
    in_use = final.exists() or (run_dir.is_dir() and bool(earlier_run_files(run_dir)))
    if resume:
        if checkpoint.is_file():
            return "resume", [f"resuming {name} from {checkpoint}"]
        if in_use:
            raise AttenCraftError(
                f"{name!r} has no checkpoint to resume (a finished run keeps it only with keep_checkpoint on): turn "
                "resume off and overwrite on to train it again, or change name.")
        return "new", [f"nothing to resume under {name!r}; training from step 0"]
    if in_use:
        if overwrite:
            return "replace", [f"overwrite is on: the earlier {name} is replaced"]
        what = "a concept set" if final.exists() else "a stopped run (resume can continue it)"
        raise AttenCraftError(f"The name {name!r} is already used by {what}: turn on overwrite to replace it, turn "
                              "on resume to continue its run, or change name.")
    return "new", []


LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")


def lora_module(key: str) -> str:
    """The module name of a LoRA tensor's key (kohya `lora_unet_..` or diffusers `transformer.<path>`)."""
    return next((key.removesuffix(s) for s in LORA_SUFFIXES if key.endswith(s)), key)


def check_lora_keys(lora: dict[str, torch.Tensor], key_map: dict[str, str]) -> None:
    """Every LoRA module must map onto a model weight (ComfyUI would otherwise skip it with a warning)."""
    bases = {lora_module(k) for k in lora}
    missing = sorted(b for b in bases if b not in key_map)
    if missing:
        raise AttenCraftError(f"{len(missing)} LoRA layers do not match this MODEL (e.g. {missing[0]}): "
                              "the concept set was trained on another base model.")
