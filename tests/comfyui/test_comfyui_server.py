"""The pack inside a real ComfyUI server, driven headless through its HTTP API (skipped without COMFYUI_DIR).

Start: ComfyUI on 127.0.0.1 with --cpu, the pack loaded via --extra-model-paths-config, a tiny SD-1.5-detected
checkpoint generated here. Every bundled API workflow runs; UI workflows resolve against /object_info.
"""

import importlib.util
import io
import json
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from attencraft_core.checkpoint import load_checkpoint
from comfy_support import (ROOT, ComfyServer, api_workflow, build_sd15_checkpoint, build_sdxl_checkpoint, comfy_dir,
                          find_mask_seed, load_client, with_user_masks)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(comfy_dir() is None, reason="COMFYUI_DIR is not set (ComfyUI is not on PyPI)")]

client = load_client()
CKPT = "tiny_sd15.safetensors"
SDXL_CKPT = "tiny_sdxl.safetensors"
spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
build = sys.modules["build_workflows"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(build)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    build_sd15_checkpoint(base / "models" / "checkpoints" / CKPT)
    (base / "models" / "checkpoints" / SDXL_CKPT).symlink_to(build_sdxl_checkpoint())
    started = time.time()
    srv = ComfyServer(base)
    srv.startup_seconds = time.time() - started
    yield srv
    srv.stop()


def workflow(name: str, **overrides) -> dict:
    return api_workflow(name, CKPT, **overrides)


def run(server, wf: dict, timeout=900):
    events = []
    cid = uuid.uuid4().hex
    prompt_id = client.queue(server.url, wf, cid)
    entry = client.wait(server.url, prompt_id, cid, wf, client.Deadline(timeout), show=events.append)
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
    return find_mask_seed(lambda wf: run(server, wf)[0], CKPT)


def test_the_workflows_node_specs_are_the_servers(server):
    """workflows/node_specs.json (what build_workflows.py writes the workflows from) is this ComfyUI's
    /object_info for those node types, so the bundled workflows match the nodes as they are."""
    info = server.get("/object_info")
    recorded = json.loads((ROOT / "workflows" / "node_specs.json").read_text())
    for kind, spec in recorded.items():
        assert kind in info, f"unknown node {kind}"
        live = build.without_file_lists(kind, {k: info[kind][k] for k in spec})
        assert live == spec, f"{kind} differs from node_specs.json: run build_workflows.py --record"
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
    return workflow("attencraft_full_pipeline", **{
        "3.seed": mask_seed, "3.threshold": 0.0, "5.steps": steps, "5.learning_rate": 0.01, "5.rank": 4,
        "5.name": name, "5.prior_images": ["2", 0], "5.preview_every": 0, **extra})


def shown_text(entry, node_id) -> str:
    return "".join(entry["outputs"][node_id]["text"])


def test_full_pipeline_then_apply_saved(server, mask_seed):
    started = time.time()
    entry, events = run(server, full(server, mask_seed, "duo", 3, **{"5.loss_mask_margin": 2,
                                                                      "5.preview_every": 3, "5.save_every": 2}))
    seconds = time.time() - started
    assert client.failure_message(entry) is None, client.failure_message(entry)
    assert any("[node 5 AttenCraftTrainLoRA] 3/3" in e for e in events)
    base = server.base / "models"
    assert (base / "loras" / "attencraft" / "duo.safetensors").is_file()
    prompt = shown_text(entry, "40")
    assert prompt.startswith("a photo of embedding:attencraft/duo_") and prompt.endswith("_c0 on the beach")
    embedding = prompt.split("embedding:")[1].split()[0]
    assert (base / "embeddings" / f"{embedding}.safetensors").is_file()
    run_dir = base / "attencraft" / "duo_run"
    assert (run_dir / "duo_preview_000003.png").is_file()
    assert not (run_dir / "checkpoint.safetensors").exists()  # a finished run keeps what a user needs only
    with safe_open(base / "attencraft" / "duo.safetensors", "pt") as f:
        assert json.loads(f.metadata()["training"])["loss_mask_margin"] == 2  # the node's input reached training
    listed = server.get("/object_info/AttenCraftApplyConcepts")["AttenCraftApplyConcepts"]["input"]["required"][
        "saved_concept_set"][1]["options"]
    assert "duo.safetensors" in listed and "duo_run/duo_step000002.safetensors" in listed
    assert not [n for n in listed if "kohya" in n or "_c0" in n or "checkpoint" in n or n.endswith("_run/duo.safetensors")]
    log = (server.base / "comfyui.log").read_text()
    assert "lora key not loaded" not in log and "does not exist, ignoring" not in log
    together = image_outputs(server, entry, "73")[0]
    c0 = image_outputs(server, entry, "53")[0]

    saved, _ = run(server, workflow("attencraft_apply_saved", **{"7.saved_concept_set": "duo.safetensors"}))
    assert client.failure_message(saved) is None, client.failure_message(saved)
    assert shown_text(saved, "40") == prompt  # the same embedding names: same content
    assert np.array_equal(image_outputs(server, saved, "53")[0], c0)  # the saved set reproduces the run
    base_model, _ = run(server, workflow("attencraft_apply_saved", **{"7.saved_concept_set": "duo.safetensors",
                                                                      "7.strength": 0.0}))
    assert not np.array_equal(image_outputs(server, base_model, "53")[0], c0)  # the LoRA changes generation
    assert together.shape == (512, 512, 3)

    again, _ = run(server, full(server, mask_seed, "duo", 3, **{"5.seed": 1}))
    assert "already used" in client.failure_message(again) and "overwrite" in client.failure_message(again)
    replaced, _ = run(server, full(server, mask_seed, "duo", 3, **{"5.seed": 1, "5.overwrite": True}))
    assert client.failure_message(replaced) is None, client.failure_message(replaced)
    assert shown_text(replaced, "40") != prompt  # a retrained set gets new embedding names, never stale ones
    print(f"\nfull pipeline (3 training steps, 3 x 2 sampling steps) took {seconds:.0f} s; "
          f"ComfyUI started in {server.startup_seconds:.0f} s")


def test_cancel_during_training_keeps_the_last_checkpoint(server, mask_seed):
    wf = full(server, mask_seed, "cancelled", 60)  # checkpoint every 6 steps
    cid = uuid.uuid4().hex
    prompt_id = client.queue(server.url, wf, cid)
    import websocket

    ws = websocket.WebSocket()
    ws.connect(server.url.replace("http", "ws") + f"/ws?clientId={cid}", timeout=600)
    def next_event() -> dict:
        while isinstance(message := ws.recv(), bytes):  # previews and node text come as binary frames
            pass
        return json.loads(message)

    seen = 0
    while seen < 8:
        event = next_event()
        if event.get("type") == "progress" and event["data"].get("node") == "5":
            seen = event["data"]["value"]
    urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", data=b"", method="POST"))
    last = seen
    deadline = time.time() + 300
    while time.time() < deadline:
        event = next_event()
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
    for _ in range(60):  # the server stores the history entry just after it reports the interruption
        history = server.get(f"/history/{prompt_id}").get(prompt_id)
        if history:
            break
        time.sleep(0.5)
    assert client.failure_message(history).startswith("interrupted")

    refused, _ = run(server, full(server, mask_seed, "cancelled", 60))
    assert "stopped run" in client.failure_message(refused) and "resume" in client.failure_message(refused)
    steps = state["step"] + 2
    resumed, _ = run(server, full(server, mask_seed, "cancelled", steps, **{"5.resume": True}))
    assert client.failure_message(resumed) is None, client.failure_message(resumed)
    with safe_open(server.base / "models" / "attencraft" / "cancelled.safetensors", "pt") as f:
        assert json.loads(f.metadata()["training"])["steps_done"] == steps
    log = json.loads((checkpoint.parent / "cancelled_train.json").read_text())
    assert [h["step"] for h in log["history"]] == list(range(1, steps + 1))  # continued, not restarted
    assert not checkpoint.exists()


def test_sdxl_workflows_run_on_a_checkpoint_comfyui_detects_as_sdxl(server):
    """The bundled SDXL full pipeline, then SDXL apply-saved, through POST /prompt on a checkpoint that ComfyUI's
    own loader detects as SDXL (small random UNet in SDXL base's layout, full-size text towers): 2 training
    steps at SDXL's 1024 px, the LoRA with every key loaded, embeddings found by ComfyUI's SDXL CLIP, and
    generation (256 px latents, 2 sampling steps). Random weights give no separable attention, so Extract ends
    in the method's own ambiguity error (after the SDXL attention pass) and Train takes the user's masks."""
    wf = api_workflow("attencraft_sdxl_full_pipeline", SDXL_CKPT, **{"3.threshold": 0.0})
    entry, _ = run(server, {k: v for k, v in wf.items() if k in ("1", "2", "3", "4")})
    assert "Ambiguous masks" in client.failure_message(entry) and "AttenCraftExtractConceptMasks" in client.failure_message(entry)

    latents = {f"43.{side}": 256 for side in ("width", "height")}
    wf = with_user_masks(api_workflow("attencraft_sdxl_full_pipeline", SDXL_CKPT, **{
        "5.steps": 2, "5.learning_rate": 0.01, "5.rank": 4, "5.name": "xl", "5.prior_images": ["2", 0],
        "5.preview_every": 0, **latents}), server.base / "input", "xl")
    started = time.time()
    entry, events = run(server, wf, timeout=1800)
    seconds = time.time() - started
    assert client.failure_message(entry) is None, client.failure_message(entry)
    assert any("[node 5 AttenCraftTrainLoRA] 2/2" in e for e in events)
    base = server.base / "models"
    with safe_open(base / "attencraft" / "xl.safetensors", "pt") as f:
        assert f.metadata()["base_family"] == "sdxl"
    log = (server.base / "comfyui.log").read_text()
    assert "lora key not loaded" not in log
    prompt = shown_text(entry, "40")
    embedding = prompt.split("embedding:")[1].split()[0]
    with safe_open(base / "embeddings" / f"{embedding}.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
    c0 = image_outputs(server, entry, "53")[0]
    assert c0.shape == (256, 256, 3) and image_outputs(server, entry, "73")[0].shape == (256, 256, 3)
    saved, _ = run(server, api_workflow("attencraft_sdxl_apply_saved", SDXL_CKPT,
                                        **{"7.saved_concept_set": "xl.safetensors", **latents}))
    assert client.failure_message(saved) is None, client.failure_message(saved)
    assert shown_text(saved, "40") == prompt and np.array_equal(image_outputs(server, saved, "53")[0], c0)
    print(f"\nSDXL full pipeline (2 training steps at 1024 px, 3 x 2 sampling steps) took {seconds:.0f} s")


def test_bad_inputs_are_node_errors_and_the_server_keeps_serving(server, mask_seed):
    entry, _ = run(server, workflow("attencraft_masks_only", **{"3.concepts": "cat"}))
    message = client.failure_message(entry)
    assert "AttenCraftExtractConceptMasks" in message and "at least two concepts" in message
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["exception_type"] == "AttenCraft.AttenCraftNodeError"  # a readable type, not a file path
    entry, _ = run(server, workflow("attencraft_masks_only", **{"3.seed": 0, "3.threshold": 0.99}))
    message = client.failure_message(entry)
    assert "threshold" in message and "--" not in message  # node inputs, not command-line flags
    with pytest.raises(client.ClientError, match="node 2 \\(LoadImage\\)"):
        client.queue(server.url, workflow("attencraft_masks_only", **{"2.image": "missing.png"}), "x")
    entry, _ = run(server, full(server, mask_seed, "../escape", 1))
    assert "AttenCraftTrainLoRA" in client.failure_message(entry) and "is not allowed" in client.failure_message(entry)
    assert server.get("/system_stats")["system"]["comfyui_version"]
    # the headless client's --set asks the server which inputs a node has: optional ones count, typos do not
    inputs = client.node_inputs(server.url, "AttenCraftTrainLoRA")
    assert {"steps", "prior_images", "resolution", "overwrite"} <= inputs
    wf = workflow("attencraft_full_pipeline")
    with pytest.raises(client.ClientError, match="node 5 \\(AttenCraftTrainLoRA\\) has no input 'stpes'; its inputs"):
        client.apply_overrides(wf, ["5.stpes=3"], lambda kind: client.node_inputs(server.url, kind))


def test_client_reports_an_unreachable_server(capsys):
    code = client.main([str(ROOT / "workflows" / "api" / "attencraft_masks_only.json"),
                        "--server", "http://127.0.0.1:9"])
    assert code == 2 and "Cannot reach ComfyUI" in capsys.readouterr().err
