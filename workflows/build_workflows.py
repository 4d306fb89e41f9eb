"""Writes the bundled workflows in ComfyUI's API format (workflows/api/) and UI format (workflows/ui/) from one
description each, and the example image they load. Run: python workflows/build_workflows.py

The node types' inputs (order, widgets, seed controls) come from node_specs.json: ComfyUI's /object_info for the
node types used, recorded from a running ComfyUI with the pack (`--record http://127.0.0.1:8188`). The
integration tests compare it with a live server's, so the workflows cannot drift from the node schemas.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SPECS = HERE / "node_specs.json"
EXAMPLE = HERE / "attencraft_example.png"
NO_FILE = "(none: use the concept_set input)"
CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
FLUX_FILES = {"unet_name": "flux1-dev.safetensors", "clip_name1": "t5xxl_fp16.safetensors",
              "clip_name2": "clip_l.safetensors", "vae_name": "ae.safetensors"}  # the names ComfyUI's Flux guide uses
NAME = "attencraft_concepts"
SDXL_NAME = "attencraft_sdxl_concepts"
FLUX_NAME = "attencraft_flux_concepts"
CHECKPOINT = {"model": (1, 0), "clip": (1, 1), "vae": (1, 2)}  # Load Checkpoint's outputs
SEPARATE = {"model": (1, 0), "clip": (8, 0), "vae": (9, 0)}  # Load Diffusion Model, DualCLIPLoader, Load VAE
WORDS = "ball, cube"
NEGATIVE = "blurry, low quality, deformed"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note"}  # frontend-only nodes: in the UI file, not in the API file
GROUP_ORDER = ["load", "masks", "training", "generation"]
GROUP_COLOURS = {"load": "#3f789e", "masks": "#8A8", "training": "#b58b2a", "generation": "#a1309b"}


@dataclass
class Node:
    """One node of a bundled workflow: type, input values (a (node id, output slot) tuple is a link), the
    group it sits in and its column inside the group."""

    id: int
    type: str
    values: dict = field(default_factory=dict)
    group: str = "load"
    column: int = 0
    title: str | None = None


# ---- the node types ----------------------------------------------------------------------------------------------
def load_specs() -> dict:
    return json.loads(SPECS.read_text())


def record_specs(server: str, types: set[str]) -> None:
    """Save the /object_info entries of `types` from a running ComfyUI (with the pack loaded)."""
    with urllib.request.urlopen(f"{server.rstrip('/')}/object_info", timeout=60) as r:
        info = json.loads(r.read())
    missing = sorted(types - set(info))
    if missing:
        raise SystemExit(f"{server} does not know {', '.join(missing)}: is the pack loaded?")
    keep = ("input", "input_order", "output", "output_name")
    specs = {t: without_file_lists(t, {k: info[t][k] for k in keep}) for t in sorted(types)}
    SPECS.write_text(json.dumps(specs, indent=1) + "\n")
    print(f"wrote {SPECS}")


FILE_LISTS = {"LoadImage": "image", "CheckpointLoaderSimple": "ckpt_name", "AttenCraftApplyConcepts": "saved_concept_set"}


def without_file_lists(kind: str, spec: dict) -> dict:
    """`spec` with the choices of an input that lists the server's files emptied (they vary by machine)."""
    name = FILE_LISTS.get(kind)
    entry = spec["input"].get("required", {}).get(name)
    if entry is not None:
        if isinstance(entry[0], list):
            entry[0] = []
        else:
            entry[1]["options"] = []
    return spec


def inputs_of(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input in ComfyUI's order; a COMBO's type is "COMBO"."""
    result = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind, *rest = spec["input"][section][name]
            result.append((name, "COMBO" if isinstance(kind, list) else kind, rest[0] if rest else {}))
    return result


def has_seed_control(name: str, options: dict) -> bool:
    """Whether the frontend adds a "control after generate" widget after this input (its value is saved)."""
    control = options.get("control_after_generate")
    return bool(control) if control is not None else name in ("seed", "noise_seed")


# ---- API format --------------------------------------------------------------------------------------------------
def to_api(nodes: list[Node], specs: dict) -> dict:
    api = {}
    for node in nodes:
        if node.type in VIRTUAL:
            continue
        known = {name for name, _, _ in inputs_of(specs[node.type])}
        unknown = set(node.values) - known
        if unknown:
            raise ValueError(f"{node.type} has no input {', '.join(sorted(unknown))}")
        api[str(node.id)] = {"class_type": node.type, "inputs": {
            k: [str(v[0]), v[1]] if isinstance(v, tuple) else v for k, v in node.values.items()}}
        if node.title:
            api[str(node.id)]["_meta"] = {"title": node.title}
    return api


# ---- UI format ---------------------------------------------------------------------------------------------------
TITLE, SLOT, WIDGET, MULTILINE, WIDTH, GAP = 30, 22, 26, 110, 360, 40


def node_height(node: Node, specs: dict) -> int:
    """Room for the node's sockets, widgets and any image it shows (generous: nothing may overlap)."""
    if node.type in VIRTUAL:
        return 60 + 18 * (node.values["text"].count("\n") + len(node.values["text"]) // 55)
    spec = specs[node.type]
    sockets = sum(1 for _, kind, _ in inputs_of(spec) if kind not in WIDGET_TYPES)
    widgets = sum(1 + has_seed_control(n, o) + bool(o.get("image_upload")) for n, kind, o in inputs_of(spec)
                  if kind in WIDGET_TYPES)
    multiline = sum(1 for _, kind, o in inputs_of(spec) if kind == "STRING" and o.get("multiline"))
    shows_image = node.type in ("SaveImage", "LoadImage", "AttenCraftExtractConceptMasks", "AttenCraftTrainLoRA")
    return (max(sockets, len(spec["output"])) * SLOT + widgets * WIDGET + multiline * MULTILINE + 20
            + (280 if shows_image else 0))


def layout(nodes: list[Node], specs: dict) -> tuple[dict[int, tuple[list, list]], list[dict]]:
    """Positions and sizes: groups left to right, columns inside a group, nodes stacked in a column; and the
    groups' boxes."""
    placed, groups, x = {}, [], 40
    for group in [g for g in GROUP_ORDER if any(n.group == g for n in nodes)]:
        members = [n for n in nodes if n.group == group]
        columns = max(n.column for n in members) + 1
        bottom = 0
        for column in range(columns):
            y = 100
            for node in (n for n in members if n.column == column):
                height = node_height(node, specs)
                placed[node.id] = ([x + 20 + column * (WIDTH + GAP), y + TITLE], [WIDTH, height])
                y += TITLE + height + GAP
            bottom = max(bottom, y)
        width = columns * (WIDTH + GAP) + 20 - GAP + 20
        groups.append({"title": group, "bounding": [x, 40, width, bottom - 40], "color": GROUP_COLOURS[group],
                       "font_size": 24, "flags": {}})
        x += width + 60
    return placed, groups


def to_ui(nodes: list[Node], specs: dict) -> dict:
    links, outgoing = [], {}
    for node in nodes:
        if node.type in VIRTUAL:
            continue
        for name, kind, _ in inputs_of(specs[node.type]):
            value = node.values.get(name)
            if isinstance(value, tuple):
                source = next(n for n in nodes if n.id == value[0])
                link_type = specs[source.type]["output"][value[1]]
                links.append([len(links) + 1, value[0], value[1], node.id, None, link_type])
                outgoing.setdefault(value, []).append(len(links))
    placed, groups = layout(nodes, specs)
    ui_nodes = []
    for order, node in enumerate(nodes):
        pos, size = placed[node.id]
        entry = {"id": node.id, "type": node.type, "pos": pos, "size": size, "flags": {}, "order": order,
                 "mode": 0, "inputs": [], "outputs": [], "properties": {"Node name for S&R": node.type}}
        if node.title:
            entry["title"] = node.title
        if node.type in VIRTUAL:
            entry.update(properties={"text": ""}, widgets_values=[node.values["text"]], color="#432", bgcolor="#653")
            ui_nodes.append(entry)
            continue
        spec, widgets = specs[node.type], []
        for name, kind, options in inputs_of(spec):
            value = node.values.get(name, options.get("default"))
            linked = isinstance(value, tuple)
            if kind in WIDGET_TYPES:
                widgets.append(options.get("default", "") if linked else value)
                if has_seed_control(name, options):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")
            if linked or kind not in WIDGET_TYPES:
                socket = {"name": name, "type": kind, "link": None}
                if kind in WIDGET_TYPES:
                    socket["widget"] = {"name": name}
                if linked:
                    link = next(lk for lk in links if lk[3] == node.id and lk[1:3] == list(value) and lk[4] is None)
                    link[4] = len(entry["inputs"])
                    socket["link"] = link[0]
                entry["inputs"].append(socket)
        entry["outputs"] = [{"name": out_name, "type": kind, "links": outgoing.get((node.id, slot), []),
                             "slot_index": slot}
                            for slot, (out_name, kind) in enumerate(zip(spec["output_name"], spec["output"]))]
        entry["widgets_values"] = widgets
        ui_nodes.append(entry)
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": groups, "config": {}, "extra": {}, "version": 0.4}


# ---- the workflows -----------------------------------------------------------------------------------------------
def model_loaders(ckpt: str | None) -> list[Node]:
    """Load Checkpoint (`ckpt`), or for Flux (None) the three loaders ComfyUI's Flux guide uses."""
    if ckpt is not None:
        return [Node(1, "CheckpointLoaderSimple", {"ckpt_name": ckpt}, "load")]
    return [Node(1, "UNETLoader", {"unet_name": FLUX_FILES["unet_name"], "weight_dtype": "default"}, "load"),
            Node(8, "DualCLIPLoader", {"clip_name1": FLUX_FILES["clip_name1"], "clip_name2": FLUX_FILES["clip_name2"],
                                       "type": "flux"}, "load"),
            Node(9, "VAELoader", {"vae_name": FLUX_FILES["vae_name"]}, "load")]


def loaders(note: str, ckpt: str | None = CKPT) -> list[Node]:
    return [Node(90, "Note", {"text": note}, "load"), *model_loaders(ckpt),
            Node(2, "LoadImage", {"image": EXAMPLE.name}, "load")]


def generation(apply: Node, vae, size: int = 512, flux: bool = False) -> list[Node]:
    """Apply Concepts, a prompt per concept and one with both, each sampled with a fixed seed and saved. Flux:
    Flux Guidance 3.5 on each prompt, cfg 1 (the negative prompt is then unused), 20 steps, a 16-channel latent."""
    nodes = [apply,
             Node(40, "AttenCraftConceptPrompt", {"concept_set": (apply.id, 3),
                                                  "text": "a photo of <c0> on the beach"}, "generation", 0),
             Node(41, "AttenCraftConceptPrompt", {"concept_set": (apply.id, 3),
                                                  "text": "a photo of <c1> on the beach"}, "generation", 0),
             Node(42, "CLIPTextEncode", {"text": "" if flux else NEGATIVE, "clip": (apply.id, 1)}, "generation", 0,
                  "Negative prompt (unused at cfg 1)" if flux else "Negative prompt"),
             Node(43, "EmptySD3LatentImage" if flux else "EmptyLatentImage",
                  {"width": size, "height": size, "batch_size": 1}, "generation", 0)]
    prompts = [((40, 0), "attencraft/c0_alone"), ((41, 0), "attencraft/c1_alone"),
               ((apply.id, 2), "attencraft/together")]
    steps, cfg, scheduler = (20, 1.0, "simple") if flux else (30, 7.5, "normal")
    for i, (text, prefix) in enumerate(prompts):
        nid = 50 + 10 * i
        positive = (nid + 4, 0) if flux else (nid, 0)
        nodes += [Node(nid, "CLIPTextEncode", {"text": text, "clip": (apply.id, 1)}, "generation", 1 + i)]
        if flux:
            nodes += [Node(nid + 4, "FluxGuidance", {"conditioning": (nid, 0), "guidance": 3.5}, "generation",
                           1 + i)]
        nodes += [Node(nid + 1, "KSampler", {"model": (apply.id, 0), "seed": 42, "steps": steps, "cfg": cfg,
                                             "sampler_name": "euler", "scheduler": scheduler, "positive": positive,
                                             "negative": (42, 0), "latent_image": (43, 0), "denoise": 1.0},
                       "generation", 1 + i),
                  Node(nid + 2, "VAEDecode", {"samples": (nid + 1, 0), "vae": vae}, "generation", 1 + i),
                  Node(nid + 3, "SaveImage", {"images": (nid + 2, 0), "filename_prefix": prefix}, "generation",
                       1 + i)]
    return nodes


def extract_node(src: dict = CHECKPOINT) -> Node:
    return Node(3, "AttenCraftExtractConceptMasks", {
        "model": src["model"], "clip": src["clip"], "vae": src["vae"], "image": (2, 0), "concepts": WORDS,
        "seed": 0, "t_min": 0, "t_max": 300, "threshold": 0.1}, "masks")


def masks_only() -> list[Node]:
    return [*loaders("Set Load Checkpoint to an SD 1.5 or SD 2.x checkpoint and Load Image to your picture, then "
                     "name each object to separate in Extract Concept Masks (concepts: one word each, comma-"
                     "separated).\n\nIf two masks overlap or one is empty: try another seed, a lower threshold or "
                     "a more specific word."),
            extract_node(),
            Node(4, "SaveImage", {"images": (3, 1), "filename_prefix": "attencraft/overlay"}, "masks"),
            Node(5, "MaskToImage", {"mask": (3, 0)}, "masks", 1),
            Node(6, "SaveImage", {"images": (5, 0), "filename_prefix": "attencraft/mask"}, "masks", 1)]


FLUX_LOAD_NOTE = ("Flux.1 loads as ComfyUI's Flux guide loads it: Load Diffusion Model (flux1-dev or schnell, "
                  "fp8 works), DualCLIPLoader (t5xxl and clip_l, type flux), Load VAE (ae).")


def full_pipeline(ckpt: str | None = CKPT, name: str = NAME, size: int = 512, kind: str = "an SD 1.5 or SD 2.x"
                  ) -> list[Node]:
    src = CHECKPOINT if ckpt is not None else SEPARATE
    apply = Node(7, "AttenCraftApplyConcepts", {"model": src["model"], "clip": src["clip"], "strength": 1.0,
                                                "saved_concept_set": NO_FILE, "concept_set": (5, 0)}, "generation")
    load = (f"Set Load Checkpoint to {kind} checkpoint" if ckpt is not None else
            f"{FLUX_LOAD_NOTE} Set them to your files,") + " and Load Image to your picture; name each object in " \
        "Extract Concept Masks."
    return [*loaders(f"{load}\n\nTrain LoRA writes the set under its name; a name in use needs overwrite (or "
                     "resume to continue a stopped run). Previews show in the node while it trains.\n\nThe Concept "
                     "Prompt nodes turn <c0>, <c1> into the trained embeddings.", ckpt),
            extract_node(src),
            Node(4, "SaveImage", {"images": (3, 1), "filename_prefix": "attencraft/overlay"}, "masks"),
            Node(5, "AttenCraftTrainLoRA", {
                "model": src["model"], "clip": src["clip"], "vae": src["vae"], "image": (2, 0), "steps": 500,
                "learning_rate": 1e-4, "rank": 16, "sampling_policy": "adaptive", "seed": 0, "name": name,
                "concepts": (3, 2)}, "training"),
            Node(6, "SaveImage", {"images": (5, 2), "filename_prefix": "attencraft/loss"}, "training"),
            *generation(apply, src["vae"], size, flux=ckpt is None)]


def apply_saved(ckpt: str | None = CKPT, name: str = NAME, size: int = 512) -> list[Node]:
    src = CHECKPOINT if ckpt is not None else SEPARATE
    apply = Node(7, "AttenCraftApplyConcepts", {"model": src["model"], "clip": src["clip"], "strength": 1.0,
                                                "saved_concept_set": f"{name}.safetensors"}, "generation")
    note = "Pick a trained set in Apply Concepts (saved_concept_set; press R after training to refresh the list). " \
           "Write prompts with <c0>, <c1> in the Concept Prompt nodes."
    return [Node(90, "Note", {"text": note if ckpt is not None else f"{FLUX_LOAD_NOTE}\n\n{note}"}, "load"),
            *model_loaders(ckpt),
            *generation(apply, src["vae"], size, flux=ckpt is None)]


SDXL = dict(ckpt=SDXL_CKPT, name=SDXL_NAME, size=1024)
FLUX = dict(ckpt=None, name=FLUX_NAME, size=1024)
WORKFLOWS = {"attencraft_full_pipeline": full_pipeline, "attencraft_masks_only": masks_only,
             "attencraft_apply_saved": apply_saved,
             "attencraft_sdxl_full_pipeline": lambda: full_pipeline(**SDXL, kind="an SDXL (base or fine-tune)"),
             "attencraft_sdxl_apply_saved": lambda: apply_saved(**SDXL),
             "attencraft_flux_full_pipeline": lambda: full_pipeline(**FLUX),
             "attencraft_flux_apply_saved": lambda: apply_saved(**FLUX)}


# ---- the example image -------------------------------------------------------------------------------------------
def example_image(size: int = 512) -> Image.Image:
    """A red ball and a blue cube on a table (the workflows' concepts "ball, cube"), drawn, so it ships freely."""
    y, x = np.mgrid[0:size, 0:size] / size
    wall = np.stack([0.86 - 0.1 * y, 0.82 - 0.1 * y, 0.74 - 0.1 * y], -1)
    floor = np.stack([0.55 - 0.15 * (1 - y), 0.38 - 0.12 * (1 - y), 0.22 - 0.08 * (1 - y)], -1)
    image = Image.fromarray((np.clip(np.where((y > 0.58)[..., None], floor, wall), 0, 1) * 255).astype(np.uint8))
    draw, s = ImageDraw.Draw(image, "RGBA"), size
    draw.ellipse([0.16 * s, 0.74 * s, 0.46 * s, 0.82 * s], fill=(40, 25, 15, 110))  # the ball's shadow
    draw.polygon([(0.56 * s, 0.80 * s), (0.86 * s, 0.80 * s), (0.93 * s, 0.74 * s), (0.64 * s, 0.74 * s)],
                 fill=(40, 25, 15, 110))  # the cube's shadow
    cx, cy, r = 0.3, 0.62, 0.16  # the ball: a sphere lit from the upper left, with a highlight
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / r ** 2
    light = np.clip(-0.5 * (x - cx) / r - 0.6 * (y - cy) / r + 0.62 * np.sqrt(np.clip(1 - d2, 0, 1)), 0, 1)
    shade, highlight = 0.25 + 0.75 * light, light ** 30
    ball = np.stack([0.85 * shade + highlight, 0.1 * shade + highlight, 0.08 * shade + highlight], -1)
    pixels = np.where((d2 <= 1)[..., None], np.clip(ball, 0, 1), np.asarray(image) / 255)
    image = Image.fromarray((pixels * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0.56 * s, 0.52 * s), (0.80 * s, 0.52 * s), (0.80 * s, 0.78 * s), (0.56 * s, 0.78 * s)],
                 fill=(40, 80, 200))  # the cube: front, top, side
    draw.polygon([(0.56 * s, 0.52 * s), (0.64 * s, 0.45 * s), (0.88 * s, 0.45 * s), (0.80 * s, 0.52 * s)],
                 fill=(110, 150, 235))
    draw.polygon([(0.80 * s, 0.52 * s), (0.88 * s, 0.45 * s), (0.88 * s, 0.71 * s), (0.80 * s, 0.78 * s)],
                 fill=(22, 45, 130))
    return image.filter(ImageFilter.SMOOTH)


def rendered(specs: dict) -> dict[str, str]:
    """Every workflow file's text by its path under workflows/ (what main writes)."""
    files = {}
    for name, build in WORKFLOWS.items():
        nodes = build()
        for fmt, convert in (("api", to_api), ("ui", to_ui)):
            files[f"{fmt}/{name}.json"] = json.dumps(convert(nodes, specs), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", metavar="URL", help="first save node_specs.json from this running ComfyUI")
    args = ap.parse_args(argv)
    if args.record:
        record_specs(args.record, {n.type for build in WORKFLOWS.values() for n in build()} - VIRTUAL)
    for path, text in rendered(load_specs()).items():
        (HERE / path).parent.mkdir(exist_ok=True)
        (HERE / path).write_text(text)
        print(f"wrote {HERE / path}")
    example_image().save(EXAMPLE)
    print(f"wrote {EXAMPLE}")


if __name__ == "__main__":
    main()
