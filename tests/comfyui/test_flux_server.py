"""The bundled Flux workflows inside a real ComfyUI server, through POST /prompt (skipped without COMFYUI_DIR).

A server of its own (Flux's T5-XXL is 4.8 GB even in fp8): the files users load Flux.1-dev from, random
(comfy_support.build_flux_files), in ComfyUI's diffusion_models, text_encoders and vae folders. About 18 GB of
memory and ten minutes on two CPU cores.
"""

import time
import uuid

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfy_support import ComfyServer, api_workflow, build_flux_files, comfy_dir, load_client, with_user_masks

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(comfy_dir() is None, reason="COMFYUI_DIR is not set (ComfyUI is not on PyPI)")]

client = load_client()
FOLDERS = {"unet": "diffusion_models", "clip_l": "text_encoders", "t5xxl": "text_encoders", "vae": "vae"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_flux")
    files = build_flux_files()
    for kind, path in files.items():
        folder = base / "models" / FOLDERS[kind]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).symlink_to(path)
    srv = ComfyServer(base)
    srv.files = {kind: path.name for kind, path in files.items()}
    yield srv
    srv.stop()


def flux_workflow(server, name: str, **overrides) -> dict:
    files = server.files
    return api_workflow(name, "", **{"1.unet_name": files["unet"], "8.clip_name1": files["t5xxl"],
                                     "8.clip_name2": files["clip_l"], "9.vae_name": files["vae"],
                                     **{f"43.{side}": 256 for side in ("width", "height")}, **overrides})


def run(server, wf: dict, timeout=1800):
    events = []
    cid = uuid.uuid4().hex
    prompt_id = client.queue(server.url, wf, cid)
    return client.wait(server.url, prompt_id, cid, wf, client.Deadline(timeout), show=events.append), events


def image_output(server, entry, node_id) -> np.ndarray:
    import io
    import urllib.request

    image = entry["outputs"][node_id]["images"][0]
    query = "&".join(f"{k}={image[k]}" for k in ("filename", "subfolder", "type"))
    with urllib.request.urlopen(f"{server.url}/view?{query}") as r:
        return np.asarray(Image.open(io.BytesIO(r.read())))


def test_flux_workflows_run_on_the_files_comfyui_loads_flux_from(server):
    """Extract reads the joint attention of the Flux MODEL (random weights separate nothing, so it ends in the
    method's own mask error, or gives masks); Train learns from the user's masks (2 steps at 256 px, through the
    fp8 T5), writes the LoRA in diffusers' names (every key loaded) and clip_l + t5xxl embeddings; the prompts
    with Flux Guidance sample; Flux apply-saved reproduces the first image."""
    wf = flux_workflow(server, "attencraft_flux_full_pipeline", **{"3.threshold": 0.0, "3.resolution": 256})
    entry, _ = run(server, {k: v for k, v in wf.items() if k in ("1", "2", "3", "4", "8", "9")})
    failure = client.failure_message(entry)
    assert failure is None or ("AttenCraftExtractConceptMasks" in failure and (
        "Ambiguous masks" in failure or "No pixel was confidently given" in failure)), failure

    wf = with_user_masks(flux_workflow(server, "attencraft_flux_full_pipeline", **{
        "5.steps": 2, "5.learning_rate": 0.01, "5.rank": 4, "5.name": "fx", "5.prior_images": ["2", 0],
        "5.preview_every": 0, "5.resolution": 256}), server.base / "input", "fx")
    started = time.time()
    entry, events = run(server, wf)
    seconds = time.time() - started
    assert client.failure_message(entry) is None, client.failure_message(entry)
    assert any("[node 5 AttenCraftTrainLoRA] 2/2" in e for e in events)
    models = server.base / "models"
    with safe_open(models / "attencraft" / "fx.safetensors", "pt") as f:
        assert f.metadata()["base_family"] == "flux"
    with safe_open(models / "loras" / "attencraft" / "fx.safetensors", "pt") as f:
        assert all(k.startswith("transformer.transformer_blocks.") for k in f.keys())
    log = (server.base / "comfyui.log").read_text()
    assert "lora key not loaded" not in log and "ERROR lora" not in log
    prompt = "".join(entry["outputs"]["40"]["text"])
    embedding = prompt.split("embedding:")[1].split()[0]
    with safe_open(models / "embeddings" / f"{embedding}.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["clip_l", "t5xxl"]
    c0 = image_output(server, entry, "53")
    assert c0.shape == (256, 256, 3) and image_output(server, entry, "73").shape == (256, 256, 3)
    saved, _ = run(server, flux_workflow(server, "attencraft_flux_apply_saved",
                                         **{"7.saved_concept_set": "fx.safetensors"}))
    assert client.failure_message(saved) is None, client.failure_message(saved)
    assert "".join(saved["outputs"]["40"]["text"]) == prompt
    assert np.array_equal(image_output(server, saved, "53"), c0)
    print(f"\nFlux full pipeline (2 training steps at 256 px, 3 x 2 sampling steps) took {seconds:.0f} s")
