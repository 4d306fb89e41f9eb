"""The AttenCraft nodes in ComfyUI's V3 schema: plumbing over the core's API. Their setting inputs are built from
the core's settings (one definition of each default, range and help). The core imports diffusers, transformers
and peft only where it uses them, so the pack loads without them and a missing one is a node error."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import comfy.lora
import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io, ui
from PIL import Image
from server import PromptServer

from ..attencraft_core.api import (PRECISIONS, ConceptSet, MaskOptions, Trainer, TrainOptions, is_concept_set, is_snapshot,
                                   settings_of, value_type)
from .bridge import components_from_comfy, model_text_width
from .comfy_progress import ComfyProgress
from .logic import (TrainedConcepts, check_lora_keys, check_name, comfy_file_paths, extract, fill_prompt,
                    image_from_comfy, image_to_comfy, images_from_comfy, prompt_syntax, together_prompt,
                    training_inputs, training_plan, write_comfy_files, write_embeddings)
from .node_errors import AttenCraftNodeError, node_errors

CATEGORY = "AttenCraft"
Concepts = io.Custom("ATTENCRAFT_CONCEPTS")
ConceptSetType = io.Custom("ATTENCRAFT_CONCEPT_SET")
SETS_FOLDER = "attencraft"
NO_FILE = "(none: use the concept_set input)"
SEED_MAX = 2**31 - 1  # the seed widgets' range in the bundled workflows
EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "workflows" / "attencraft_example.png"


def _require_dependencies() -> None:
    """A readable node error when the pack's requirements are not installed in ComfyUI's Python."""
    missing = [m for m in ("diffusers", "transformers", "peft", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise AttenCraftNodeError(f"AttenCraft needs {', '.join(missing)}: run `pip install -r requirements.txt` "
                                  "from custom_nodes/comfyui-attencraft with ComfyUI's Python, then restart ComfyUI.")


def _register_folder() -> str:
    """models/attencraft holds the concept-set files; registered once with ComfyUI's folder_paths."""
    if SETS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[SETS_FOLDER] = (
            [os.path.join(folder_paths.models_dir, SETS_FOLDER)], {".safetensors"})
    return folder_paths.get_folder_paths(SETS_FOLDER)[0]


def _saved_sets() -> list[str]:
    """The concept sets in models/attencraft: finished sets, and the step snapshots inside run folders."""
    _register_folder()
    sets = []
    for name in folder_paths.get_filename_list(SETS_FOLDER):
        path = folder_paths.get_full_path(SETS_FOLDER, name)
        top_level = "/" not in name.replace(os.sep, "/")
        if path and (top_level or is_snapshot(name)) and is_concept_set(Path(path)):
            sets.append(name)
    return [NO_FILE] + sorted(sets)


def _write_embeddings(concept_set: ConceptSet, name: str) -> list[str]:
    """The set's embeddings in ComfyUI's embeddings folder (see logic.write_embeddings); their prompt names."""
    return write_embeddings(concept_set, name, folder_paths.get_folder_paths("embeddings")[0])


def _install_example_image() -> None:
    """Copy the bundled workflows' example image into ComfyUI's input folder (never over a user's file)."""
    try:
        target = Path(folder_paths.get_input_directory()) / EXAMPLE_IMAGE.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(EXAMPLE_IMAGE, target)
    except OSError as exc:
        logging.warning("AttenCraft: could not copy the example image into the input folder (%s)", exc)


def _show_text(node_id, text: str) -> None:
    """Text shown on node `node_id` in the editor (it stays until the node runs again)."""
    if PromptServer.instance is not None and node_id is not None:
        PromptServer.instance.send_progress_text(text, node_id)


def _progress(node_id) -> ComfyProgress:
    """The core's progress shown on node `node_id`: its progress bar, a text line, and ComfyUI's cancel."""
    return ComfyProgress(lambda total: comfy.utils.ProgressBar(total, node_id=node_id),
                         lambda text: _show_text(node_id, text), mm.throw_exception_if_processing_interrupted)


def _checkpoint_inputs(image_tooltip: str) -> list:
    """MODEL, CLIP and VAE of one SD 1.x, 2.x or SDXL checkpoint (never changed by the pack) and the concepts' image."""
    return [
        io.Model.Input("model", tooltip="An SD 1.x, 2.x or SDXL MODEL from Load Checkpoint, or a Flux.1 MODEL from "
                                        "Load Diffusion Model (not changed)."),
        io.Clip.Input("clip", tooltip="The CLIP of the same model (Flux: DualCLIPLoader, type flux; not changed)."),
        io.Vae.Input("vae", tooltip="The VAE of the same model."),
        io.Image.Input("image", tooltip=image_tooltip),
    ]


def _setting_input(cls, name: str, input_name: str | None = None, **overrides):
    """A node input for one of the core's settings: default, range or choices and tooltip from its definition.
    Seeds stay fixed (no "control after generate"), so a second Run reuses the cached masks and training."""
    f = {f.name: f for f in settings_of(cls)}[name]
    meta, default = f.metadata, getattr(cls(), name)
    options = {"default": default, "tooltip": meta["help"][0].upper() + meta["help"][1:] + ".", **overrides}
    if meta["choices"]:
        return io.Combo.Input(input_name or name, options=list(meta["choices"]), **options)
    if value_type(f) is bool:
        return io.Boolean.Input(input_name or name, **options)
    options = {"min": meta["low"], "max": meta["high"], **options}
    if value_type(f) is int:
        return io.Int.Input(input_name or name, control_after_generate=False if name == "seed" else None, **options)
    return io.Float.Input(input_name or name, **options)


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
                io.String.Input("concepts", default="ball, cube",
                                tooltip="One word per concept, comma-separated, at least two. Each word also "
                                        "initialises that concept's token."),
                *_mask_inputs(),
                _setting_input(MaskOptions, "resolution", optional=True, default=0, min=0, step=64,
                               tooltip="Square side in px the image is resized to for the attention pass, 0 = the "
                                       "model's own (SD 1.x 512, SDXL and Flux 1024); lower is faster and lighter."),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="One mask per concept (batch), at the image's size."),
                io.Image.Output(display_name="overlay", tooltip="The image with each mask tinted in its colour."),
                Concepts.Output(display_name="concepts",
                                tooltip="Masks, words and attention scores for Train AttenCraft LoRA."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @node_errors
    def execute(cls, model, clip, vae, image, concepts, seed, t_min, t_max, threshold,
                resolution=0) -> io.NodeOutput:
        _require_dependencies()
        progress = _progress(cls.hidden.unique_id)
        opts = MaskOptions(seed=seed, t_min=t_min, t_max=t_max, threshold=threshold, resolution=resolution or None)
        with torch.inference_mode(False):
            comps = components_from_comfy(model, clip, vae, progress)
            masks, preview, value = extract(comps, image.clone(), concepts, opts, progress)
        for note in value.notes:
            logging.info("AttenCraft: %s", note)
        summary = [f"{c.word}: attention score {s:.3f}" for c, s in zip(value.concepts, value.scores)]
        _show_text(cls.hidden.unique_id, "\n".join(summary + value.notes))
        return io.NodeOutput(masks, preview, value, ui=ui.PreviewImage(preview, cls=cls))


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttenCraftTrainLoRA", display_name="AttenCraft Train LoRA", category=CATEGORY,
            description="Learns every concept of the image: concept embeddings + a LoRA with masked and attention "
                        "losses. Writes loras/attencraft/<name>.safetensors and models/attencraft/<name>.safetensors "
                        "(the run's masks, loss curve and previews in models/attencraft/<name>_run).",
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
                _setting_input(TrainOptions, "preview_every", optional=True, default=100),
                _setting_input(TrainOptions, "save_every", optional=True),
                _setting_input(TrainOptions, "keep_last", optional=True),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="Continue the stopped (or kept) run of this name from its checkpoint, "
                                         "exactly where it was; steps may be raised."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an earlier set of this name. Off: a name in use is an error."),
                _setting_input(TrainOptions, "keep_checkpoint", optional=True),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                               tooltip="Dtype of the model's frozen weights while training on a GPU (auto: bf16 "
                                       "where the GPU has it, else fp16). The LoRA and concept embeddings always "
                                       "learn in fp32; the CPU always uses fp32."),
                _setting_input(TrainOptions, "gradient_checkpointing", optional=True),
                _setting_input(TrainOptions, "resolution", optional=True, default=0, min=0, step=64,
                               tooltip="Square side in px the image is resized to for training, 0 = the model's "
                                       "own (SD 1.x 512, SDXL and Flux 1024); lower is faster and lighter."),
            ],
            outputs=[
                ConceptSetType.Output(display_name="concept_set", tooltip="The trained concepts, for Apply Concepts."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA's name in the loras list."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @node_errors
    def execute(cls, model, clip, vae, image, steps, learning_rate, rank, sampling_policy, seed, name,
                concepts=None, masks=None, concept_words="", prior_images=None, loss_mask_margin=0,
                preview_every=100, save_every=0, keep_last=3, resume=False, overwrite=False,
                keep_checkpoint=False, precision="auto", gradient_checkpointing=False,
                resolution=0) -> io.NodeOutput:
        _require_dependencies()
        name = check_name(name)
        sets_dir = _register_folder()
        plan, notes = training_plan(name, sets_dir, resume, overwrite)
        opts = TrainOptions(steps=steps, lr=learning_rate, rank=rank, policy=sampling_policy, seed=seed,
                            loss_mask_margin=loss_mask_margin, checkpoint_every=max(1, min(100, steps // 10)),
                            preview_every=preview_every, save_every=save_every, keep_last=keep_last,
                            keep_checkpoint=keep_checkpoint, gradient_checkpointing=gradient_checkpointing,
                            resolution=resolution or None)
        log = lambda line: logging.info("AttenCraft: %s", line)  # noqa: E731
        for note in notes:
            log(note)
        progress = _progress(cls.hidden.unique_id)
        with torch.inference_mode(False):
            concept_list, user_masks = training_inputs(concepts, masks.clone() if masks is not None else None,
                                                       concept_words or "")
            paths = comfy_file_paths(name, folder_paths.get_folder_paths("loras")[0], sets_dir)
            pil, _ = image_from_comfy(image.clone())
            priors = images_from_comfy(prior_images.clone() if prior_images is not None else None)
            comps = components_from_comfy(model, clip, vae, progress, precision)
            trainer = Trainer(comps, pil, concept_list, os.path.join(sets_dir, f"{name}_run"), opts,
                              user_masks=user_masks, class_images=priors,
                              cache_dir=os.path.join(sets_dir, "class_images"), log=log, progress=progress,
                              on_preview=progress.show_preview)
            if plan == "resume":
                trainer.resume()
            result = trainer.run(name, replace=plan == "replace")
            write_comfy_files(result.concept_set, paths)
            embeddings = _write_embeddings(result.concept_set, name)
            curve = image_to_comfy(Image.open(result.files["loss_curve"]))
        _show_text(cls.hidden.unique_id, "\n".join(notes + [f"trained {steps} steps; LoRA loras/attencraft/{name}"
                                                             ".safetensors"] + [f"embedding:{e}" for e in embeddings]))
        return io.NodeOutput(TrainedConcepts(result.concept_set, name), f"attencraft/{name}.safetensors", curve,
                             ui=ui.PreviewImage(curve, cls=cls))


class ApplyConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttenCraftApplyConcepts", display_name="AttenCraft Apply Concepts", category=CATEGORY,
            description="Applies a trained concept set's LoRA with ComfyUI's own LoRA loading and writes its "
                        "concepts' embeddings; the node shows their names for CLIP Text Encode.",
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
                io.String.Output(display_name="prompt",
                                 tooltip="A prompt with every concept, ready for CLIP Text Encode's text input."),
                ConceptSetType.Output(display_name="concept_set",
                                      tooltip="The applied set, for AttenCraft Concept Prompt."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @node_errors
    def execute(cls, model, clip, strength, saved_concept_set, concept_set=None) -> io.NodeOutput:
        _require_dependencies()
        _register_folder()
        if concept_set is None:
            if saved_concept_set == NO_FILE:
                raise AttenCraftNodeError("Choose a saved_concept_set, or connect Train AttenCraft LoRA's "
                                          "concept_set output to the concept_set input.")
            path = folder_paths.get_full_path(SETS_FOLDER, saved_concept_set)
            if path is None:
                raise AttenCraftNodeError(f"saved_concept_set {saved_concept_set!r} is not in models/{SETS_FOLDER}: "
                                          "pick another one (press R to refresh the list).")
            stem = os.path.splitext(os.path.basename(saved_concept_set))[0]
            concept_set = TrainedConcepts(ConceptSet.load(path), check_name(stem))
        cs, name = concept_set.concept_set, concept_set.name
        cs.check_text_width(model_text_width(model), "the MODEL")
        names = _write_embeddings(cs, name)
        lora = cs.comfy_lora()
        check_lora_keys(lora, comfy.lora.model_lora_keys_unet(model.model, {}))
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, strength, 0.0)
        syntax = prompt_syntax(cs, names)
        _show_text(cls.hidden.unique_id, syntax)
        return io.NodeOutput(new_model, new_clip, together_prompt(cs, names), concept_set, ui=ui.PreviewText(syntax))


class ConceptPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttenCraftConceptPrompt", display_name="AttenCraft Concept Prompt", category=CATEGORY,
            description="Writes a prompt with the concepts by placeholder (<c0>, <c1>...) and gives it with each "
                        "placeholder replaced by that concept's embedding, for CLIP Text Encode's text input.",
            inputs=[
                ConceptSetType.Input("concept_set", tooltip="From Apply Concepts or Train AttenCraft LoRA."),
                io.String.Input("text", default="a photo of <c0> on the beach", multiline=True,
                                tooltip="Your prompt; <c0> is the first concept word, <c1> the second..."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The prompt for CLIP Text Encode.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @node_errors
    def execute(cls, concept_set, text) -> io.NodeOutput:
        names = _write_embeddings(concept_set.concept_set, concept_set.name)
        prompt = fill_prompt(text, concept_set.concept_set, names)
        _show_text(cls.hidden.unique_id, prompt)
        return io.NodeOutput(prompt, ui=ui.PreviewText(prompt))


class AttenCraftExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ExtractConceptMasks, TrainLoRA, ApplyConcepts, ConceptPrompt]


async def comfy_entrypoint() -> AttenCraftExtension:
    _install_example_image()
    return AttenCraftExtension()
