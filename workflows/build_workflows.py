"""Writes the bundled workflows in ComfyUI's API format (workflows/api/) and UI format (workflows/ui/) from one
description each, so the two never disagree. Run: python workflows/build_workflows.py

NODE_TYPES lists, per node type, its inputs in ComfyUI's order (sockets and widgets) and its outputs; the
integration tests check it against a real ComfyUI's /object_info.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
NO_FILE = "(none: use the concept_set input)"

# name -> (inputs [(name, socket type or "WIDGET" or "SEED" (widget + control_after_generate))], outputs [(name, type)])
NODE_TYPES = {
    "CheckpointLoaderSimple": ([("ckpt_name", "WIDGET")], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoadImage": ([("image", "WIDGET"), ("upload", "UPLOAD")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CLIPTextEncode": ([("text", "WIDGET"), ("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([("width", "WIDGET"), ("height", "WIDGET"), ("batch_size", "WIDGET")],
                         [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("seed", "SEED"), ("steps", "WIDGET"), ("cfg", "WIDGET"),
                  ("sampler_name", "WIDGET"), ("scheduler", "WIDGET"), ("positive", "CONDITIONING"),
                  ("negative", "CONDITIONING"), ("latent_image", "LATENT"), ("denoise", "WIDGET")],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE"), ("filename_prefix", "WIDGET")], []),
    "MaskToImage": ([("mask", "MASK")], [("IMAGE", "IMAGE")]),
    "AttenCraftExtractConceptMasks": (
        [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("image", "IMAGE"), ("concepts", "WIDGET"),
         ("seed", "WIDGET"), ("t_min", "WIDGET"), ("t_max", "WIDGET"), ("threshold", "WIDGET")],
        [("masks", "MASK"), ("overlay", "IMAGE"), ("concepts", "ATTENCRAFT_CONCEPTS")]),
    "AttenCraftTrainLoRA": (
        [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("image", "IMAGE"), ("steps", "WIDGET"),
         ("learning_rate", "WIDGET"), ("rank", "WIDGET"), ("sampling_policy", "WIDGET"), ("seed", "WIDGET"),
         ("name", "WIDGET"), ("concepts", "ATTENCRAFT_CONCEPTS"), ("masks", "MASK"), ("concept_words", "WIDGET"),
         ("prior_images", "IMAGE"), ("loss_mask_margin", "WIDGET")],
        [("concept_set", "ATTENCRAFT_CONCEPT_SET"), ("lora_name", "STRING"), ("loss_curve", "IMAGE")]),
    "AttenCraftApplyConcepts": (
        [("model", "MODEL"), ("clip", "CLIP"), ("strength", "WIDGET"), ("saved_concept_set", "WIDGET"),
         ("concept_set", "ATTENCRAFT_CONCEPT_SET")],
        [("model", "MODEL"), ("clip", "CLIP"), ("prompt_syntax", "STRING")]),
}

CKPT = "v1-5-pruned-emaonly.safetensors"
IMAGE = "attencraft_two_objects.png"
NAME = "attencraft_concepts"
NEGATIVE = "blurry, low quality, deformed"


def sampler_chain(nodes: dict, first_id: int, model, clip, vae, prompts: list[tuple[str, str]]) -> None:
    """Negative prompt, one latent, and for each (prompt, prefix): encode, sample, decode, save."""
    neg, latent = first_id, first_id + 1
    nodes[neg] = ("CLIPTextEncode", {"text": NEGATIVE, "clip": clip})
    nodes[latent] = ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1})
    nid = latent + 1
    for text, prefix in prompts:
        nodes[nid] = ("CLIPTextEncode", {"text": text, "clip": clip})
        nodes[nid + 1] = ("KSampler", {"model": model, "seed": 42, "steps": 30, "cfg": 7.5, "sampler_name": "euler",
                                       "scheduler": "normal", "positive": (nid, 0), "negative": (neg, 0),
                                       "latent_image": (latent, 0), "denoise": 1.0})
        nodes[nid + 2] = ("VAEDecode", {"samples": (nid + 1, 0), "vae": vae})
        nodes[nid + 3] = ("SaveImage", {"images": (nid + 2, 0), "filename_prefix": prefix})
        nid += 4


def concept_prompts(name: str) -> list[tuple[str, str]]:
    c0, c1 = f"embedding:{name}_c0", f"embedding:{name}_c1"
    return [(f"a photo of {c0} on the beach", "attencraft/c0_alone"),
            (f"a photo of {c1} on the beach", "attencraft/c1_alone"),
            (f"a photo of {c0} and {c1}", "attencraft/together")]


def full_pipeline() -> dict:
    n = {1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}),
         2: ("LoadImage", {"image": IMAGE, "upload": "image"}),
         3: ("AttenCraftExtractConceptMasks", {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "image": (2, 0),
                                               "concepts": "cat, dog", "seed": 0, "t_min": 0, "t_max": 300,
                                               "threshold": 0.1}),
         4: ("SaveImage", {"images": (3, 1), "filename_prefix": "attencraft/overlay"}),
         5: ("AttenCraftTrainLoRA", {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "image": (2, 0), "steps": 500,
                                     "learning_rate": 1e-4, "rank": 16, "sampling_policy": "adaptive", "seed": 0,
                                     "name": NAME, "concepts": (3, 2), "concept_words": "",
                                     "loss_mask_margin": 0}),
         6: ("SaveImage", {"images": (5, 2), "filename_prefix": "attencraft/loss"}),
         7: ("AttenCraftApplyConcepts", {"model": (1, 0), "clip": (1, 1), "strength": 1.0,
                                         "saved_concept_set": NO_FILE, "concept_set": (5, 0)})}
    sampler_chain(n, 10, (7, 0), (7, 1), (1, 2), concept_prompts(NAME))
    return n


def masks_only() -> dict:
    return {1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}),
            2: ("LoadImage", {"image": IMAGE, "upload": "image"}),
            3: ("AttenCraftExtractConceptMasks", {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "image": (2, 0),
                                                  "concepts": "cat, dog", "seed": 0, "t_min": 0, "t_max": 300,
                                                  "threshold": 0.1}),
            4: ("SaveImage", {"images": (3, 1), "filename_prefix": "attencraft/overlay"}),
            5: ("MaskToImage", {"mask": (3, 0)}),
            6: ("SaveImage", {"images": (5, 0), "filename_prefix": "attencraft/mask"})}


def apply_saved() -> dict:
    n = {1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}),
         2: ("AttenCraftApplyConcepts", {"model": (1, 0), "clip": (1, 1), "strength": 1.0,
                                         "saved_concept_set": f"{NAME}.safetensors"})}
    sampler_chain(n, 10, (2, 0), (2, 1), (1, 2), concept_prompts(NAME))
    return n


WORKFLOWS = {"attencraft_full_pipeline": full_pipeline, "attencraft_masks_only": masks_only,
             "attencraft_apply_saved": apply_saved}


def to_api(nodes: dict) -> dict:
    api = {}
    for nid, (kind, inputs) in nodes.items():
        api[str(nid)] = {"class_type": kind, "inputs": {
            k: [str(v[0]), v[1]] if isinstance(v, tuple) else v for k, v in inputs.items() if k != "upload"}}
    return api


def to_ui(nodes: dict) -> dict:
    links, ui_nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for nid, (kind, inputs) in nodes.items():
        spec_inputs, _ = NODE_TYPES[kind]
        for name, socket in spec_inputs:
            value = inputs.get(name)
            if isinstance(value, tuple):
                link_id = len(links) + 1
                links.append([link_id, value[0], value[1], nid, None, socket])
                outgoing.setdefault(value, []).append(link_id)
    order = {nid: i for i, nid in enumerate(nodes)}
    for index, (nid, (kind, inputs)) in enumerate(nodes.items()):
        spec_inputs, spec_outputs = NODE_TYPES[kind]
        ui_inputs, widgets = [], []
        for name, socket in spec_inputs:
            value = inputs.get(name)
            if socket in ("WIDGET", "SEED", "UPLOAD"):
                widgets.append(value)
                if socket == "SEED":
                    widgets.append("fixed")
            elif isinstance(value, tuple):
                link = next(lk for lk in links if lk[3] == nid and lk[1:3] == list(value) and lk[4] is None)
                link[4] = len(ui_inputs)
                ui_inputs.append({"name": name, "type": socket, "link": link[0]})
            else:
                ui_inputs.append({"name": name, "type": socket, "link": None})
        outputs = [{"name": name, "type": typ, "links": outgoing.get((nid, slot), []), "slot_index": slot}
                   for slot, (name, typ) in enumerate(spec_outputs)]
        column, row = divmod(index, 4)
        ui_nodes.append({"id": nid, "type": kind, "pos": [40 + 360 * column, 40 + 260 * row], "size": [320, 220],
                         "flags": {}, "order": order[nid], "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                         "properties": {"Node name for S&R": kind}, "widgets_values": widgets})
    return {"last_node_id": max(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    for name, build in WORKFLOWS.items():
        nodes = build()
        for fmt, convert in (("api", to_api), ("ui", to_ui)):
            folder = HERE / fmt
            folder.mkdir(exist_ok=True)
            (folder / f"{name}.json").write_text(json.dumps(convert(nodes), indent=2) + "\n")
            print(f"wrote {folder / name}.json")


if __name__ == "__main__":
    main()
