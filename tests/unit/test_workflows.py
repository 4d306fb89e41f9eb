"""The bundled workflows: written from one description and the recorded node schemas, laid out readably, and
loading what the pack ships."""

import importlib.util
import json
import sys

import pytest

from comfy_support import ROOT

spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
build = sys.modules["build_workflows"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(build)
SPECS = build.load_specs()
UI = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "workflows" / "ui").glob("*.json"))}
API = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "workflows" / "api").glob("*.json"))}


def test_the_files_are_what_the_builder_writes():
    for path, text in build.rendered(SPECS).items():
        assert (ROOT / "workflows" / path).read_text() == text, f"{path}: run python workflows/build_workflows.py"
    assert set(UI) == set(API) == set(build.WORKFLOWS)


@pytest.mark.parametrize("name", sorted(build.WORKFLOWS))
def test_ui_widget_values_line_up_with_the_frontends_widgets(name):
    """The frontend fills widgets from widgets_values in input order, adding a "control after generate" value
    after a seed (unless the input turns it off): one missing value shifts every later widget."""
    api = API[name]
    for node in UI[name]["nodes"]:
        if node["type"] in build.VIRTUAL:
            continue
        values = list(node["widgets_values"])
        for input_name, kind, options in build.inputs_of(SPECS[node["type"]]):
            if kind not in build.WIDGET_TYPES:
                continue
            value = values.pop(0)
            wanted = api[str(node["id"])]["inputs"].get(input_name, options.get("default"))
            if not isinstance(wanted, list):  # a linked widget keeps its default
                assert value == wanted, f"{name}: {node['type']}.{input_name}"
            if build.has_seed_control(input_name, options):
                assert values.pop(0) == "fixed", f"{name}: {node['type']}.{input_name} must stay fixed"
            if options.get("image_upload"):
                values.pop(0)
        assert values == [], f"{name}: {node['type']} has extra widget values"


def test_the_packs_seeds_have_no_randomize_control():
    for kind, node_spec in SPECS.items():
        for input_name, _, options in build.inputs_of(node_spec):
            if kind.startswith("AttenCraft") and input_name == "seed":
                assert options.get("control_after_generate") is False  # fixed: a second Run reuses the cache


@pytest.mark.parametrize("name", sorted(build.WORKFLOWS))
def test_nodes_do_not_overlap_and_sit_in_their_groups(name):
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - build.TITLE, n["size"][0], n["size"][1] + build.TITLE)
             for n in UI[name]["nodes"]}
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        ax, ay, aw, ah = boxes[a]
        for b in ids[i + 1:]:
            bx, by, bw, bh = boxes[b]
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, f"{name}: {a} overlaps {b}"
    groups = {g["title"]: g["bounding"] for g in UI[name]["groups"]}
    assert set(groups) <= {"load", "masks", "training", "generation"}
    for node in UI[name]["nodes"]:
        x, y, w, h = boxes[node["id"]]
        assert any(gx <= x and x + w <= gx + gw and gy <= y and y + h <= gy + gh
                   for gx, gy, gw, gh in groups.values()), f"{name}: node {node['id']} is outside every group"


def test_the_example_image_ships_and_the_workflows_load_it():
    assert (ROOT / "workflows" / "attencraft_example.png").is_file()
    for name, api in API.items():
        for node in api.values():
            if node["class_type"] == "LoadImage":
                assert node["inputs"]["image"] == "attencraft_example.png", name


def test_generation_prompts_come_from_the_concept_set():
    """No prompt names an embedding file by hand: the names carry a content hash only the nodes know."""
    for name, api in API.items():
        for node in api.values():
            if node["class_type"] == "CLIPTextEncode" and "embedding:" in json.dumps(node["inputs"]):
                pytest.fail(f"{name}: a hand-written embedding name")
        prompts = [n for n in api.values() if n["class_type"] == "AttenCraftConceptPrompt"]
        if name != "attencraft_masks_only":
            assert [p["inputs"]["text"] for p in prompts] == ["a photo of <c0> on the beach",
                                                             "a photo of <c1> on the beach"]


@pytest.mark.parametrize("name", ["attencraft_flux_full_pipeline", "attencraft_flux_apply_saved"])
def test_flux_workflows_load_flux_as_comfyuis_guide_does_and_sample_with_flux_guidance(name):
    nodes = API[name]
    by_type = {}
    for node_id, node in nodes.items():
        by_type.setdefault(node["class_type"], []).append((node_id, node["inputs"]))
    assert "CheckpointLoaderSimple" not in by_type
    (unet, _), = by_type["UNETLoader"]
    (clip, clip_inputs), = by_type["DualCLIPLoader"]
    (vae, _), = by_type["VAELoader"]
    assert clip_inputs["type"] == "flux"
    (apply_id, apply), = by_type["AttenCraftApplyConcepts"]
    assert apply["model"] == [unet, 0] and apply["clip"] == [clip, 0]
    for _, sampler in by_type["KSampler"]:
        guidance = nodes[sampler["positive"][0]]
        assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 3.5
        assert sampler["cfg"] == 1.0 and nodes[sampler["latent_image"][0]]["class_type"] == "EmptySD3LatentImage"
    assert all(inputs["vae"] == [vae, 0] for _, inputs in by_type["VAEDecode"])
    if name.endswith("full_pipeline"):
        for kind in ("AttenCraftExtractConceptMasks", "AttenCraftTrainLoRA"):
            (_, inputs), = by_type[kind]
            assert (inputs["model"], inputs["clip"], inputs["vae"]) == ([unet, 0], [clip, 0], [vae, 0])
