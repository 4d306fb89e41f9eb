"""The AttenCraft nodes in ComfyUI's V3 schema: plumbing over the core's API. Their setting inputs are built from
the core's settings (one definition of each default, range and help). The core imports diffusers, transformers
and peft only where it uses them, so the pack loads without them and a missing one is a node error."""

from __future__ import annotations

import importlib.util
import logging
import os

import comfy.lora
import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io, ui
from PIL import Image

from ..attencraft_core.api import (AttenCraftError, ConceptSet, MaskOptions, Trainer, TrainOptions, settings_of,
                                   to_kohya, value_type)
from .bridge import components_from_comfy
from .logic import (TrainedConcepts, check_lora_keys, check_name, comfy_file_paths, extract, image_from_comfy,
                    image_to_comfy, images_from_comfy, prompt_syntax, training_inputs, write_comfy_files)

CATEGORY = "AttenCraft"
Concepts = io.Custom("ATTENCRAFT_CONCEPTS")
ConceptSetType = io.Custom("ATTENCRAFT_CONCEPT_SET")
SETS_FOLDER = "attencraft"
NO_FILE = "(none: use the concept_set input)"
SEED_MAX = 2**31 - 1  # the seed widgets' range in the bundled workflows


def _require_dependencies() -> None:
    """A readable node error when the pack's requirements are not installed in ComfyUI's Python."""
    missing = [m for m in ("diffusers", "transformers", "peft", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"AttenCraft needs {', '.join(missing)}: run `pip install -r requirements.txt` from "
                           "custom_nodes/comfyui-attencraft with ComfyUI's Python, then restart ComfyUI.")


def _register_folder() -> str:
    """models/attencraft holds the concept-set files; registered once with ComfyUI's folder_paths."""
    if SETS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SETS_FOLDER] = (
            [os.path.join(folder_paths.models_dir, SETS_FOLDER)], {".safetensors"})
    return folder_paths.get_folder_paths(SETS_FOLDER)[0]


def _saved_sets() -> list[str]:
    _register_folder()
    return [NO_FILE] + sorted(f for f in folder_paths.get_filename_list(SETS_FOLDER) if "class_images" not in f)


def _checkpoint_inputs(image_tooltip: str) -> list:
    """MODEL, CLIP and VAE of one SD checkpoint (never changed by the pack) and the concepts' image."""
    return [
        io.Model.Input("model", tooltip="An SD 1.x or 2.x MODEL from Load Checkpoint (not changed)."),
        io.Clip.Input("clip", tooltip="The CLIP from the same checkpoint (not changed)."),
        io.Vae.Input("vae", tooltip="The VAE from the same checkpoint."),
        io.Image.Input("image", tooltip=image_tooltip),
    ]


def _setting_input(cls, name: str, input_name: str | None = None, **overrides):
    """A node input for one of the core's settings: default, range or choices and tooltip from its definition."""
    f = {f.name: f for f in settings_of(cls)}[name]
    meta, default = f.metadata, getattr(cls(), name)
    options = {"default": default, "tooltip": meta["help"][0].upper() + meta["help"][1:] + ".", **overrides}
    if meta["choices"]:
        return io.Combo.Input(input_name or name, options=list(meta["choices"]), **options)
    options = {"min": meta["low"], "max": meta["high"], **options}
    return (io.Int if value_type(f) is int else io.Float).Input(input_name or name, **options)


def _mask_inputs() -> list:
    return [
        _setting_input(MaskOptions, "seed", max=SEED_MAX),
        _setting_input(MaskOptions, "t_min", max=999),
        _setting_input(MaskOptions, "t_max", max=1000),
        _setting_input(MaskOptions, "threshold", step=0.01),
    ]


class ExtractConceptMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttenCraftExtractConceptMasks", display_name="AttenCraft Extract Concept Masks",
            category=CATEGORY,
            description="Finds each named concept in the image from the model's own attention (one step, no "
                        "segmentation model).",
            inputs=[
                *_checkpoint_inputs("One image showing every concept."),
                io.String.Input("concepts", default="cat, dog",
                                tooltip="One word per concept, comma-separated, at least two. Each word also "
                                        "initialises that concept's token."),
                *_mask_inputs(),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="One mask per concept (batch), at the image's size."),
                io.Image.Output(display_name="overlay", tooltip="The image with each mask tinted in its colour."),
                Concepts.Output(display_name="concepts",
                                tooltip="Masks, words and attention scores for Train AttenCraft LoRA."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, concepts, seed, t_min, t_max, threshold) -> io.NodeOutput:
        _require_dependencies()
        with torch.inference_mode(False):
            comps = components_from_comfy(model, clip, vae)
            masks, preview, value = extract(comps, image.clone(), concepts, seed, t_min, t_max, threshold)
        for note in value.notes:
            logging.info("AttenCraft: %s", note)
        return io.NodeOutput(masks, preview, value, ui=ui.PreviewImage(preview, cls=cls))


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttenCraftTrainLoRA", display_name="AttenCraft Train LoRA", category=CATEGORY,
            description="Learns every concept of the image: concept embeddings + a LoRA with masked and attention "
                        "losses. Writes loras/attencraft/<name>.safetensors, embeddings/<name>_c<i>.safetensors "
                        "and models/attencraft/<name>.safetensors.",
            inputs=[
                *_checkpoint_inputs("The image showing every concept."),
                _setting_input(TrainOptions, "steps"),
                _setting_input(TrainOptions, "lr", "learning_rate", min=1e-7, step=1e-5),
                _setting_input(TrainOptions, "rank", max=256),
                _setting_input(TrainOptions, "policy", "sampling_policy"),
                _setting_input(TrainOptions, "seed", max=SEED_MAX),
                io.String.Input("name", default="attencraft_concepts",
                                tooltip="Base name of the files written (letters, digits, space, - _ .)."),
                Concepts.Input("concepts", optional=True,
                               tooltip="From Extract Concept Masks. Or leave empty and give masks + words."),
                io.Mask.Input("masks", optional=True, tooltip="Your own masks, one per concept, in word order."),
                io.String.Input("concept_words", default="", optional=True,
                                tooltip="Words for your own masks, e.g. \"cat, dog\" (ignored with concepts)."),
                io.Image.Input("prior_images", optional=True,
                               tooltip="Class images for prior preservation; if empty, generated once with the "
                                       "base model and cached."),
                _setting_input(TrainOptions, "loss_mask_margin", optional=True),
            ],
            outputs=[
                ConceptSetType.Output(display_name="concept_set", tooltip="The trained concepts, for Apply Concepts."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA's name in the loras list."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, steps, learning_rate, rank, sampling_policy, seed, name,
                concepts=None, masks=None, concept_words="", prior_images=None,
                loss_mask_margin=0) -> io.NodeOutput:
        _require_dependencies()
        name = check_name(name)
        sets_dir = _register_folder()
        with torch.inference_mode(False):
            concept_list, user_masks = training_inputs(concepts, masks.clone() if masks is not None else None,
                                                       concept_words or "")
            paths = comfy_file_paths(name, folder_paths.get_folder_paths("loras")[0],
                                     folder_paths.get_folder_paths("embeddings")[0], sets_dir, len(concept_list))
            pil, _ = image_from_comfy(image.clone())
            priors = images_from_comfy(prior_images.clone() if prior_images is not None else None)
            comps = components_from_comfy(model, clip, vae)
            bar = comfy.utils.ProgressBar(steps, node_id=cls.hidden.unique_id)

            def progress(step, total, record, ratios):
                bar.update_absolute(step, total)
                mm.throw_exception_if_processing_interrupted()

            opts = TrainOptions(steps=steps, lr=learning_rate, rank=rank, policy=sampling_policy, seed=seed,
                                loss_mask_margin=loss_mask_margin, checkpoint_every=max(1, min(100, steps // 10)))
            trainer = Trainer(comps, pil, concept_list, os.path.join(sets_dir, f"{name}_run"), opts,
                              user_masks=user_masks, class_images=priors,
                              cache_dir=os.path.join(sets_dir, "class_images"), callback=progress,
                              log=lambda line: logging.info("AttenCraft: %s", line))
            result = trainer.run(name, replace=True)  # retraining a name replaces its run, as before
            write_comfy_files(result.concept_set, paths)
            curve = image_to_comfy(Image.open(result.files["loss_curve"]))
        lora_name = f"attencraft/{name}.safetensors"
        return io.NodeOutput(TrainedConcepts(result.concept_set, name), lora_name, curve,
                             ui=ui.PreviewImage(curve, cls=cls))


class ApplyConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttenCraftApplyConcepts", display_name="AttenCraft Apply Concepts", category=CATEGORY,
            description="Applies a trained concept set's LoRA with ComfyUI's own LoRA loading and makes its "
                        "concepts usable in CLIP Text Encode as embedding:<name>_c<i>.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL the concepts were trained on."),
                io.Clip.Input("clip", tooltip="The CLIP of that checkpoint."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="LoRA strength on the MODEL."),
                io.Combo.Input("saved_concept_set", options=_saved_sets(), default=NO_FILE,
                               tooltip="A concept set from models/attencraft (used when concept_set is empty)."),
                ConceptSetType.Input("concept_set", optional=True, tooltip="From Train AttenCraft LoRA."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the concepts' LoRA."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP (concept embeddings load by name)."),
                io.String.Output(display_name="prompt_syntax",
                                 tooltip="How to write each concept in CLIP Text Encode."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, strength, saved_concept_set, concept_set=None) -> io.NodeOutput:
        _require_dependencies()
        _register_folder()
        if concept_set is None:
            if saved_concept_set == NO_FILE:
                raise AttenCraftError("Choose a saved concept set, or connect Train AttenCraft LoRA's concept_set.")
            path = folder_paths.get_full_path(SETS_FOLDER, saved_concept_set)
            if path is None:
                raise AttenCraftError(f"Concept set {saved_concept_set!r} is not in models/{SETS_FOLDER}.")
            concept_set = TrainedConcepts(ConceptSet.load(path), check_name(os.path.splitext(saved_concept_set)[0]))
        cs, name = concept_set.concept_set, concept_set.name
        cs.check_text_width(model.model.model_config.unet_config.get("context_dim"), "the MODEL")
        embeddings_dir = folder_paths.get_folder_paths("embeddings")[0]
        for i in range(len(cs.concepts)):  # a set copied from elsewhere brings its embeddings along
            target = os.path.join(embeddings_dir, f"{name}_c{i}.safetensors")
            if not os.path.exists(target):
                cs.save_embedding(i, target)
        kohya = to_kohya(cs.lora, cs.alpha)
        check_lora_keys(kohya, comfy.lora.model_lora_keys_unet(model.model, {}))
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, kohya, strength, 0.0)
        return io.NodeOutput(new_model, new_clip, prompt_syntax(cs, name), ui=ui.PreviewText(prompt_syntax(cs, name)))


class AttenCraftExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ExtractConceptMasks, TrainLoRA, ApplyConcepts]


async def comfy_entrypoint() -> AttenCraftExtension:
    return AttenCraftExtension()
