"""The pack inside a real ComfyUI server, driven headless through its HTTP API (skipped without COMFYUI_DIR).

Start: ComfyUI on 127.0.0.1 with --cpu, the pack loaded via --extra-model-paths-config, a tiny SD-1.5-detected
checkpoint generated here. Every bundled API workflow runs; UI workflows resolve against /object_info.
"""

import importlib.util
import io
import json
import time
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from attencraft_core.checkpoint import load_checkpoint
from comfy_support import ROOT, ComfyServer, build_sd15_checkpoint, comfy_dir
from helpers import two_object_array

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(comfy_dir() is None, reason="COMFYUI_DIR is not set (ComfyUI is not on PyPI)")]

spec = importlib.util.spec_from_file_location("run_workflow", ROOT / "scripts" / "run_workflow.py")
client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(client)

SOCKETS_ARE_NOT = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CKPT = "tiny_sd15.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    build_sd15_checkpoint(base / "models" / "checkpoints" / CKPT)
    (base / "input").mkdir(parents=True, exist_ok=True)
    Image.fromarray(two_object_array(512)).save(base / "input" / "attencraft_two_objects.png")
    started = time.time()
    srv = ComfyServer(base)
    srv.startup_seconds = time.time() - started
    yield srv
    srv.stop()


def workflow(name: str, **overrides) -> dict:
    wf = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    for node in wf.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = CKPT
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    return client.apply_overrides(wf, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def run(server, wf: dict, timeout=900):
    events = []
    cid = uuid.uuid4().hex
    prompt_id = client.queue(server.url, wf, cid)
    entry = client.wait(server.url, prompt_id, cid, wf, timeout=timeout, show=events.append)
    return entry, events


def image_outputs(server, entry, node_id):
    images = []
    for image in entry["outputs"][node_id]["images"]:
        query = "&".join(f"{k}={image[k]}" for k in ("filename", "subfolder", "type"))
        with urllib.request.urlopen(f"{server.url}/view?{query}") as r:
            images.append(np.asarray(Image.open(io.BytesIO(r.read()))))
    return images


@pytest.fixture(scope="module")
def mask_seed(server):
    """The tiny checkpoint has random attention: the first mask seed whose masks separate the two concepts."""
    for seed in range(12):
        entry, _ = run(server, workflow("attencraft_masks_only", **{"3.seed": seed, "3.threshold": 0.0}))
        if client.failure_message(entry) is None:
            return seed
        assert "Try another --seed" in client.failure_message(entry) or "No pixel" in client.failure_message(entry)
    pytest.fail("no seed separated the concepts on the random tiny checkpoint")


def test_ui_workflows_resolve_against_object_info(server):
    info = server.get("/object_info")
    for path in sorted((ROOT / "workflows" / "ui").glob("*.json")):
        ui = json.loads(path.read_text())
        outputs_of = {}
        for node in ui["nodes"]:
            assert node["type"] in info, f"{path.name}: unknown node {node['type']}"
            spec = info[node["type"]]
            order = spec["input_order"]["required"] + spec["input_order"].get("optional", [])
            all_inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
            widgets = [n for n in order if isinstance(all_inputs[n][0], list) or all_inputs[n][0] in SOCKETS_ARE_NOT]
            extra = sum(1 for n in widgets if all_inputs[n][1].get("control_after_generate")
                        or n == "seed" and node["type"] == "KSampler")
            extra += sum(1 for n in widgets if all_inputs[n][1].get("image_upload"))
            assert len(node["widgets_values"]) == len(widgets) + extra, f"{path.name}: {node['type']} widgets"
            for socket in node["inputs"]:
                assert socket["name"] in all_inputs, f"{path.name}: {node['type']} has no input {socket['name']}"
            outputs_of[node["id"]] = spec["output"]
        for link_id, src, slot, dst, dst_slot, typ in ui["links"]:
            assert outputs_of[src][slot] == typ, f"{path.name}: link {link_id} type {typ}"
            target = next(n for n in ui["nodes"] if n["id"] == dst)
            assert target["inputs"][dst_slot]["link"] == link_id
    for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        for node in json.loads(path.read_text()).values():
            assert node["class_type"] in info


def test_masks_only_workflow(server, mask_seed):
    entry, _ = run(server, workflow("attencraft_masks_only", **{"3.seed": mask_seed, "3.threshold": 0.0}))
    assert client.failure_message(entry) is None
    overlay = image_outputs(server, entry, "4")[0]
    masks = image_outputs(server, entry, "6")
    assert overlay.shape == (512, 512, 3) and len(masks) == 2 and masks[0].shape[:2] == (512, 512)


def full(server, mask_seed, name, steps, **extra):
    return workflow("attencraft_full_pipeline", **extra, **{
        "3.seed": mask_seed, "3.threshold": 0.0, "5.steps": steps, "5.learning_rate": 0.01, "5.rank": 4,
        "5.name": name, "5.prior_images": ["2", 0],
        **{f"{nid}.text": f"a photo of embedding:{name}_c{i} on the beach" for nid, i in (("12", 0), ("16", 1))},
        "20.text": f"a photo of embedding:{name}_c0 and embedding:{name}_c1"})


def test_full_pipeline_then_apply_saved(server, mask_seed):
    started = time.time()
    entry, events = run(server, full(server, mask_seed, "duo", 3, **{"5.loss_mask_margin": 2}))
    seconds = time.time() - started
    assert client.failure_message(entry) is None, client.failure_message(entry)
    assert any("[node 5 AttenCraftTrainLoRA] 3/3" in e for e in events)
    base = server.base / "models"
    assert (base / "loras" / "attencraft" / "duo.safetensors").is_file()
    assert (base / "embeddings" / "duo_c0.safetensors").is_file()
    assert (base / "embeddings" / "duo_c1.safetensors").is_file()
    with safe_open(base / "attencraft" / "duo.safetensors", "pt") as f:
        assert json.loads(f.metadata()["training"])["loss_mask_margin"] == 2  # the node's input reached training
    log = (server.base / "comfyui.log").read_text()
    assert "lora key not loaded" not in log
    together = image_outputs(server, entry, "23")[0]
    c0 = image_outputs(server, entry, "15")[0]

    saved, _ = run(server, workflow("attencraft_apply_saved", **{"2.saved_concept_set": "duo.safetensors",
                                                                 "12.text": "a photo of embedding:duo_c0 on the beach"}))
    assert client.failure_message(saved) is None, client.failure_message(saved)
    assert np.array_equal(image_outputs(server, saved, "15")[0], c0)  # the saved set reproduces the run
    base_model, _ = run(server, workflow("attencraft_apply_saved", **{"2.saved_concept_set": "duo.safetensors",
                                                                      "2.strength": 0.0,
                                                                      "12.text": "a photo of embedding:duo_c0 on the beach"}))
    assert not np.array_equal(image_outputs(server, base_model, "15")[0], c0)  # the LoRA changes generation
    assert together.shape == (512, 512, 3)
    print(f"\nfull pipeline (3 training steps, 3 x 2 sampling steps) took {seconds:.0f} s; "
          f"ComfyUI started in {server.startup_seconds:.0f} s")


def test_cancel_during_training_keeps_the_last_checkpoint(server, mask_seed):
    wf = full(server, mask_seed, "cancelled", 60)  # checkpoint every 6 steps
    cid = uuid.uuid4().hex
    prompt_id = client.queue(server.url, wf, cid)
    import websocket

    ws = websocket.WebSocket()
    ws.connect(server.url.replace("http", "ws") + f"/ws?clientId={cid}", timeout=600)
    seen = 0
    while seen < 8:
        event = json.loads(ws.recv())
        if event.get("type") == "progress" and event["data"].get("node") == "5":
            seen = event["data"]["value"]
    urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", data=b"", method="POST"))
    last = seen
    deadline = time.time() + 300
    while time.time() < deadline:
        event = json.loads(ws.recv())
        if event.get("type") == "progress" and event["data"].get("node") == "5":
            last = event["data"]["value"]
        if event.get("type") in ("execution_interrupted", "execution_error", "execution_success"):
            break
    ws.close()
    assert event["type"] == "execution_interrupted"
    assert last <= seen + 2, f"training went on from step {seen} to {last} after cancel"
    checkpoint = server.base / "models" / "attencraft" / "cancelled_run" / "checkpoint.safetensors"
    _, state = load_checkpoint(checkpoint)
    assert 6 <= state["step"] <= last and state["step"] % 6 == 0
    assert not (server.base / "models" / "attencraft" / "cancelled.safetensors").exists()
    history = server.get(f"/history/{prompt_id}")[prompt_id]
    assert client.failure_message(history).startswith("interrupted")


def test_bad_inputs_are_node_errors_and_the_server_keeps_serving(server, mask_seed):
    entry, _ = run(server, workflow("attencraft_masks_only", **{"3.concepts": "cat"}))
    message = client.failure_message(entry)
    assert "AttenCraftExtractConceptMasks" in message and "at least two concepts" in message
    with pytest.raises(client.ClientError, match="node 2 \\(LoadImage\\)"):
        client.queue(server.url, workflow("attencraft_masks_only", **{"2.image": "missing.png"}), "x")
    entry, _ = run(server, full(server, mask_seed, "../escape", 1))
    assert "AttenCraftTrainLoRA" in client.failure_message(entry) and "is not allowed" in client.failure_message(entry)
    assert server.get("/system_stats")["system"]["comfyui_version"]


def test_client_reports_an_unreachable_server(capsys):
    code = client.main([str(ROOT / "workflows" / "api" / "attencraft_masks_only.json"),
                        "--server", "http://127.0.0.1:9"])
    assert code == 2 and "Cannot reach ComfyUI" in capsys.readouterr().err
