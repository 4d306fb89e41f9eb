"""Run an API-format workflow on a running ComfyUI: upload the image, queue, stream progress, save outputs.

    python scripts/run_workflow.py workflows/api/attencraft_masks_only.json --image photo.png \
        --set 3.concepts="cat, dog" --set 1.ckpt_name=v1-5-pruned-emaonly.safetensors --out results/

Progress comes from ComfyUI's websocket (needs `pip install websocket-client`; without it the script polls
/history). Exit status: 0 success, 1 the workflow failed or was interrupted, 2 bad arguments, an invalid
workflow or an unreachable server.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class ClientError(Exception):
    """A problem the user can act on; printed without a traceback."""


def _request(server: str, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    try:
        req = urllib.request.Request(server.rstrip("/") + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        raise ClientError(_explain_http_error(exc.code, body)) from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise ClientError(f"Cannot reach ComfyUI at {server} ({getattr(exc, 'reason', exc)}). Is it running? "
                          "Start it with `python main.py --listen 127.0.0.1 --port 8188` or pass --server.") from exc


def _explain_http_error(code: int, body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return f"ComfyUI answered HTTP {code}: {body[:500]}"
    lines = [f"ComfyUI refused the workflow (HTTP {code}): {data.get('error', {}).get('message', '')}"]
    for node_id, err in (data.get("node_errors") or {}).items():
        for e in err.get("errors", []):
            lines.append(f"  node {node_id} ({err.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


def get_json(server: str, path: str):
    return json.loads(_request(server, path))


def upload_image(server: str, path: str | Path) -> str:
    """Upload an image to ComfyUI's input folder; returns the name LoadImage should use."""
    path = Path(path)
    if not path.is_file():
        raise ClientError(f"Image {path} does not exist.")
    boundary = uuid.uuid4().hex
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: {mime}\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
    answer = json.loads(_request(server, "/upload/image", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
    return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def apply_overrides(workflow: dict, settings: list[str]) -> dict:
    """--set NODE.INPUT=VALUE (VALUE parsed as JSON when it can be, else taken as text)."""
    for item in settings:
        target, sep, raw = item.partition("=")
        node, dot, name = target.partition(".")
        if not sep or not dot or node not in workflow:
            raise ClientError(f"--set {item!r}: use NODE_ID.INPUT=VALUE with a node id of this workflow "
                              f"({', '.join(workflow)}).")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        workflow[node]["inputs"][name] = value
    return workflow


def queue(server: str, workflow: dict, client_id: str) -> str:
    data = json.dumps({"prompt": workflow, "client_id": client_id}).encode()
    answer = json.loads(_request(server, "/prompt", data, {"Content-Type": "application/json"}))
    return answer["prompt_id"]


def wait(server: str, prompt_id: str, client_id: str, workflow: dict, timeout: float = 3600,
         show=print) -> dict:
    """Stream progress until the prompt finishes; returns its /history entry."""
    try:
        import websocket  # websocket-client
    except ImportError:
        websocket = None
        show("(install websocket-client for live progress; polling /history)")
    deadline = time.time() + timeout
    ws = None
    if websocket is not None:
        ws = websocket.WebSocket()
        ws.connect(server.replace("http", "ws", 1).rstrip("/") + f"/ws?clientId={client_id}", timeout=10)
        ws.settimeout(2)
    try:
        while time.time() < deadline:
            if ws is not None:
                try:
                    message = ws.recv()
                except websocket.WebSocketTimeoutException:
                    message = None
                if isinstance(message, str):
                    event = json.loads(message)
                    data = event.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if event["type"] == "progress":
                        node = data.get("node")
                        kind = workflow.get(str(node), {}).get("class_type", "")
                        show(f"[node {node} {kind}] {data['value']}/{data['max']}")
                    elif event["type"] == "executing" and data.get("node"):
                        node = data["node"]
                        show(f"running node {node} ({workflow.get(str(node), {}).get('class_type', '')})")
            history = get_json(server, f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry.get("outputs"):
                    return entry
            if ws is None:
                time.sleep(1)
        raise ClientError(f"The workflow did not finish within {timeout:.0f} s.")
    finally:
        if ws is not None:
            ws.close()


def failure_message(entry: dict) -> str | None:
    """The readable error of a failed or interrupted run, None on success."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_message')}"
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"the workflow ended with status {status.get('status_str')}"


def download_outputs(server: str, entry: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_id, outputs in entry.get("outputs", {}).items():
        for image in outputs.get("images", []):
            query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
            target = out / f"{node_id}_{image['filename']}"
            target.write_bytes(_request(server, f"/view?{query}"))
            saved.append(target)
        for text in outputs.get("text", []):
            target = out / f"{node_id}_text.txt"
            target.write_text(text if isinstance(text, str) else json.dumps(text))
            saved.append(target)
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", help="an API-format workflow JSON (workflows/api/...)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    parser.add_argument("--image", help="upload this image and use it in every LoadImage node")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input, e.g. --set 5.steps=200 (repeatable)")
    parser.add_argument("--out", default="comfyui_outputs", help="folder for the outputs (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        try:
            workflow = json.loads(Path(args.workflow).read_text())
        except (OSError, ValueError) as exc:
            raise ClientError(f"Cannot read workflow {args.workflow}: {exc}") from exc
        if "nodes" in workflow and "links" in workflow:
            raise ClientError(f"{args.workflow} is a UI-format workflow; use the one in workflows/api/.")
        if args.image:
            name = upload_image(args.server, args.image)
            for node in workflow.values():
                if node["class_type"] == "LoadImage":
                    node["inputs"]["image"] = name
        apply_overrides(workflow, args.set)
        client_id = uuid.uuid4().hex
        prompt_id = queue(args.server, workflow, client_id)
        print(f"queued {prompt_id}")
        entry = wait(args.server, prompt_id, client_id, workflow, args.timeout)
        problem = failure_message(entry)
        for path in download_outputs(args.server, entry, args.out):
            print(f"saved {path}")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        print("done")
        return 0
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
