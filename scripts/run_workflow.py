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
import re
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


def parse_answer(raw: bytes, what: str, expect: type = dict):
    """ComfyUI's answer as JSON of the expected type, or one readable error naming the request."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        start = raw[:80].decode(errors="replace").strip()
        raise ClientError(f"ComfyUI's answer to {what} is not JSON (it starts {start!r}). Is --server a ComfyUI "
                          "server?") from None
    if not isinstance(data, expect):
        raise ClientError(f"ComfyUI's answer to {what} is a JSON {type(data).__name__}, not a "
                          f"{expect.__name__}: this client does not understand this server version.")
    return data


def field(data: dict, key: str, kind: type, what: str):
    """data[key], which must be of type `kind`; else one readable error."""
    value = data.get(key)
    if not isinstance(value, kind):
        raise ClientError(f"ComfyUI's answer to {what} has no {kind.__name__} {key!r} (got {value!r:.80}).")
    return value


def get_json(server: str, path: str):
    return parse_answer(_request(server, path), f"GET {path}")


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
    answer = parse_answer(_request(server, "/upload/image", body,
                                   {"Content-Type": f"multipart/form-data; boundary={boundary}"}), "the upload")
    name = field(answer, "name", str, "the upload")
    subfolder = answer.get("subfolder") or ""
    if not isinstance(subfolder, str):
        raise ClientError(f"ComfyUI's answer to the upload has a subfolder that is not text: {subfolder!r:.80}")
    return f"{subfolder}/{name}" if subfolder else name


def apply_overrides(workflow: dict, settings: list[str]) -> dict:
    """--set NODE.INPUT=VALUE (VALUE parsed as JSON when it can be, else taken as text)."""
    for item in settings:
        target, sep, raw = item.partition("=")
        node, dot, name = target.partition(".")
        if not sep or not dot or not name or node not in workflow:
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
    answer = parse_answer(_request(server, "/prompt", data, {"Content-Type": "application/json"}), "POST /prompt")
    return field(answer, "prompt_id", str, "POST /prompt")


def check_workflow(workflow, source: str) -> dict:
    """An API-format workflow: {node id: {"class_type": str, "inputs": dict}}; else one readable error."""
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise ClientError(f"{source} is a UI-format workflow; use the one in workflows/api/.")
    if not isinstance(workflow, dict) or not workflow:
        raise ClientError(f"{source} is not an API-format workflow (a JSON object of nodes).")
    for node_id, node in workflow.items():
        if not (isinstance(node, dict) and isinstance(node.get("class_type"), str)
                and isinstance(node.get("inputs"), dict)):
            raise ClientError(f"{source}: node {node_id!r} has no class_type and inputs; is this an API-format "
                              "workflow?")
    return workflow


def read_event(message) -> tuple[str, dict] | None:
    """(type, data) of a websocket message, None for anything else (binary previews, odd messages)."""
    if not isinstance(message, str):
        return None
    try:
        event = json.loads(message)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    data = event.get("data")
    return event["type"], data if isinstance(data, dict) else {}


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
        try:
            ws = websocket.WebSocket()
            ws.connect(server.replace("http", "ws", 1).rstrip("/") + f"/ws?clientId={client_id}", timeout=10)
            ws.settimeout(2)
        except (OSError, websocket.WebSocketException) as exc:
            show(f"(no live progress: the websocket did not open ({exc}); polling /history)")
            ws = None
    try:
        while time.time() < deadline:
            if ws is not None:
                try:
                    event = read_event(ws.recv())
                except websocket.WebSocketTimeoutException:
                    event = None
                except (OSError, websocket.WebSocketException) as exc:
                    show(f"(the websocket closed ({exc}); polling /history)")
                    ws.close()
                    ws, event = None, None
                if event is not None:
                    kind, data = event
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    node = data.get("node")
                    node_type = workflow.get(str(node), {}).get("class_type", "")
                    if kind == "progress" and isinstance(data.get("value"), int) and isinstance(data.get("max"), int):
                        show(f"[node {node} {node_type}] {data['value']}/{data['max']}")
                    elif kind == "executing" and node:
                        show(f"running node {node} ({node_type})")
            entry = finished_entry(get_json(server, f"/history/{prompt_id}"), prompt_id)
            if entry is not None:
                return entry
            if ws is None:
                time.sleep(1)
        raise ClientError(f"The workflow did not finish within {timeout:.0f} s.")
    finally:
        if ws is not None:
            ws.close()


def finished_entry(history: dict, prompt_id: str) -> dict | None:
    """The prompt's /history entry once it has finished, None while it runs; odd shapes are one readable error."""
    entry = history.get(prompt_id)
    if entry is None:
        return None
    what = f"GET /history/{prompt_id}"
    if not isinstance(entry, dict):
        raise ClientError(f"ComfyUI's answer to {what} is not an object for the prompt.")
    status = entry.get("status") or {}
    outputs = entry.get("outputs") or {}
    if not isinstance(status, dict) or not isinstance(outputs, dict):
        raise ClientError(f"ComfyUI's answer to {what} has a status or outputs of the wrong shape.")
    if status.get("completed") is None:
        return None
    if status.get("status_str") in ("success", "error") or outputs:
        return entry
    return None


def failure_message(entry: dict) -> str | None:
    """The readable error of a failed or interrupted run, None on success."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    messages = status.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not (isinstance(message, (list, tuple)) and len(message) == 2 and isinstance(message[1], dict)):
            continue
        kind, data = message
        if kind == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_message')}"
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"the workflow ended with status {status.get('status_str')}"


def output_path(out: Path, node_id: str, filename: str) -> Path:
    """Where an output of `node_id` named by the server is saved: a plain name inside `out`, never elsewhere
    (a server's file name may hold `../` or an absolute path)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{node_id}_{Path(str(filename)).name}").lstrip(".") or "output"
    target = (out / base[:200]).resolve()
    if target.parent != out.resolve():
        raise ClientError(f"Refusing to save the server's output {filename!r} outside {out}.")
    return target


def download_outputs(server: str, entry: dict, out_dir: str | Path) -> list[Path]:
    """Save every image and text output of the entry in `out_dir` under sanitised names; returns the paths."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClientError(f"Cannot create the output folder {out} ({exc.strerror or exc}).") from exc
    saved = []
    outputs = entry.get("outputs") or {}
    for node_id, produced in outputs.items() if isinstance(outputs, dict) else []:
        if not isinstance(produced, dict):
            continue
        for image in produced.get("images") or []:
            if not (isinstance(image, dict) and isinstance(image.get("filename"), str) and image["filename"]):
                raise ClientError(f"ComfyUI listed an output image of node {node_id} without a file name.")
            query = urllib.parse.urlencode({k: str(image.get(k, "")) for k in ("filename", "subfolder", "type")})
            saved.append(write_output(output_path(out, node_id, image["filename"]),
                                      _request(server, f"/view?{query}")))
        for i, text in enumerate(produced.get("text") or []):
            data = (text if isinstance(text, str) else json.dumps(text)).encode()
            saved.append(write_output(output_path(out, node_id, f"text_{i}.txt" if i else "text.txt"), data))
    return saved


def write_output(target: Path, data: bytes) -> Path:
    try:
        target.write_bytes(data)
    except OSError as exc:
        raise ClientError(f"Cannot write {target} ({exc.strerror or exc}).") from exc
    return target


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
        check_workflow(workflow, args.workflow)
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
