"""The bundled UI workflows in the real frontend: a headless Chromium (Debian's, driven by Playwright) opens
ComfyUI with the pack, loads each workflow file as a user would, checks what the editor shows, queues it with
short settings and waits for it to finish.

Needs COMFYUI_DIR, `pip install playwright` and a Chromium (CHROMIUM, default /usr/bin/chromium; Playwright's own
download is not needed). COMFYUI_FRONTEND_ROOT=<a comfyui_frontend_package's static folder> tests another
frontend version than the one ComfyUI ships with. Run: COMFYUI_DIR=... pytest tests/comfyui/test_frontend.py
"""

import json
import os
import shutil
import time
import urllib.request

import pytest

from comfy_support import ROOT, ComfyServer, build_sd15_checkpoint, comfy_dir, find_mask_seed, load_client

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(comfy_dir() is None, reason="COMFYUI_DIR is not set (ComfyUI is not on PyPI)"),
              pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"no Chromium at {CHROMIUM}")]
client = load_client()
CKPT = "tiny_sd15.safetensors"
WORKFLOWS = ["attencraft_masks_only", "attencraft_full_pipeline", "attencraft_apply_saved"]  # the last applies
# what the middle one trains


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_frontend")
    build_sd15_checkpoint(base / "models" / "checkpoints" / CKPT)
    frontend = os.environ.get("COMFYUI_FRONTEND_ROOT")
    srv = ComfyServer(base, ("--front-end-root", frontend) if frontend else ())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.console_errors, page.failed = [], []
        page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        page.on("response", lambda r: page.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(server.url)
        page.wait_for_function("window.app && window.app.graph && window.app.graph.nodes !== undefined",
                               timeout=180_000)
        page.wait_for_timeout(3000)
        page.frontend_version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
        yield page
        browser.close()


def post_history(server) -> dict:
    with urllib.request.urlopen(f"{server.url}/history", timeout=30) as r:
        return json.loads(r.read())


def load(page, name: str) -> list[dict]:
    """Load workflows/ui/<name>.json as the editor does; returns its nodes as the editor holds them."""
    page.console_errors.clear()
    page.failed.clear()
    page.evaluate("wf => window.app.loadGraphData(wf)", json.loads((ROOT / "workflows" / "ui" / f"{name}.json")
                                                                  .read_text()))
    page.wait_for_timeout(2000)
    return page.evaluate("""() => window.app.graph.nodes.map(n => ({
        id: n.id, type: n.type, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
        need: n.computeSize ? [n.computeSize()[0], n.computeSize()[1]] : null, registered: !!LiteGraph.registered_node_types[n.type],
        widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}))""")


def set_widgets(page, changes: dict) -> None:
    page.evaluate("""changes => { for (const [id, values] of Object.entries(changes)) {
        const node = window.app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find(w => w.name === name);
            if (!widget) throw new Error(`node ${id} has no widget ${name}`);
            widget.value = value;
        } } }""", {str(k): v for k, v in changes.items()})


def queue_and_wait(page, server, timeout: float = 1200) -> dict:
    before = set(post_history(server))
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = {k: v for k, v in post_history(server).items() if k not in before}
        for entry in new.values():
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                return entry
        time.sleep(2)
    pytest.fail(f"the queued workflow did not finish in {timeout} s")


@pytest.fixture(scope="module")
def mask_seed(server):
    def run(wf):
        prompt_id = client.queue(server.url, wf, "frontend-test")
        return client.wait(server.url, prompt_id, "frontend-test", wf, client.Deadline(600), show=lambda e: None)
    return find_mask_seed(run, CKPT)


def test_frontend_version_is_recorded(page):
    print(f"\nfrontend {page.frontend_version}")
    assert page.frontend_version != "unknown"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_and_runs_from_the_browser(page, server, mask_seed, name):
    nodes = load(page, name)
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert all(n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
    missing = page.evaluate("() => [...document.querySelectorAll('.p-dialog')].map(d => d.innerText)"
                            ".filter(t => /missing|not found|not installed/i.test(t))")
    assert missing == [], missing
    # the pack's: a console error naming it, or a failed request for it or for an image (a missing input image)
    ours = ([e for e in page.console_errors if "attencraft" in e.lower()]
            + [f for f in page.failed if "attencraft" in f.lower() or "/view?" in f or "/upload" in f])
    assert ours == [], ours
    for node in nodes:  # every widget shows the value the workflow means (no shift)
        for input_name, value in api.get(str(node["id"]), {}).get("inputs", {}).items():
            if not isinstance(value, list) and input_name in node["widgets"]:
                assert node["widgets"][input_name] == value, f"{name}: node {node['id']}.{input_name}"
        if node["type"] == "KSampler":
            assert node["widgets"]["control_after_generate"] == "fixed"
        if node["need"]:
            assert node["need"][1] <= node["size"][1] + 1, f"{name}: node {node['id']} is too small"

    changes = {n["id"]: {"ckpt_name": CKPT} for n in nodes if n["type"] == "CheckpointLoaderSimple"}
    changes.update({n["id"]: {"steps": 2} for n in nodes if n["type"] == "KSampler"})
    changes.update({n["id"]: {"seed": mask_seed, "threshold": 0.0} for n in nodes
                    if n["type"] == "AttenCraftExtractConceptMasks"})
    changes.update({n["id"]: {"steps": 2, "learning_rate": 0.01, "rank": 4, "preview_every": 2} for n in nodes
                    if n["type"] == "AttenCraftTrainLoRA"})
    set_widgets(page, changes)
    for train in (n for n in nodes if n["type"] == "AttenCraftTrainLoRA"):  # prior images: the example itself
        page.evaluate("id => { const g = window.app.graph; const t = g.getNodeById(id);"
                      "g.getNodeById(2).connect(0, t, t.findInputSlot('prior_images')); }", train["id"])
    if name == "attencraft_apply_saved":
        page.evaluate("() => window.app.refreshComboInNodes()")
        page.wait_for_timeout(1000)
    entry = queue_and_wait(page, server)
    assert client.failure_message(entry) is None, client.failure_message(entry)
    saved = [n for n in nodes if n["type"] == "SaveImage"]
    assert all(entry["outputs"].get(str(n["id"]), {}).get("images") for n in saved)
    if name != "attencraft_masks_only":
        shown = "".join(entry["outputs"]["40"]["text"])
        assert shown.startswith("a photo of embedding:attencraft/attencraft_concepts_")


@pytest.mark.parametrize("name", ["attencraft_sdxl_full_pipeline", "attencraft_sdxl_apply_saved",
                                  "attencraft_flux_full_pipeline", "attencraft_flux_apply_saved"])
def test_sdxl_and_flux_workflows_load_with_every_widget_in_place(page, name):
    """No SDXL or Flux model fits this machine twice over, so these are loaded and checked, not queued (the Flux
    ones ran through the HTTP API in test_flux_server.py)."""
    nodes = load(page, name)
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert all(n["registered"] for n in nodes)
    for node in nodes:
        for input_name, value in api.get(str(node["id"]), {}).get("inputs", {}).items():
            if not isinstance(value, list) and input_name in node["widgets"]:
                assert node["widgets"][input_name] == value, f"{name}: node {node['id']}.{input_name}"
    latent = "EmptySD3LatentImage" if "flux" in name else "EmptyLatentImage"
    assert next(n for n in nodes if n["type"] == latent)["widgets"]["width"] == 1024
