"""Run an API-format workflow on a running ComfyUI: upload the image, queue, stream progress, save outputs.

    python scripts/run_workflow.py workflows/api/attencraft_masks_only.json --image photo.png \
        --set 3.concepts="cat, dog" --set 1.ckpt_name=v1-5-pruned-emaonly.safetensors --out results/

Progress comes from ComfyUI's websocket (needs `pip install websocket-client`; without it the script polls
/history). Exit status: 0 success, 1 the workflow failed or was interrupted, 2 bad arguments, an invalid
workflow or an unreachable server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import mimetypes
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class ClientError(Exception):
    """A problem the user can act on; printed without a traceback."""


MAX_ANSWER = 256 * 2 ** 20  # bytes read of one answer (an output image is far smaller)


class Deadline:
    """The time the whole run may take (--timeout): every request and every wait shares it."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def error(self) -> "ClientError":
        return ClientError(f"ComfyUI did not finish within --timeout {self.seconds:g} s.")


def _request(server: str, path: str, data: bytes | None = None, headers: dict | None = None,
             deadline: Deadline | None = None) -> bytes:
    """One HTTP request, answered within the deadline as a whole (a server that trickles bytes is cut off too);
    anything that goes wrong is one ClientError."""
    deadline = deadline or Deadline(60)
    outcome: dict = {}

    def run():
        try:
            outcome["body"] = _fetch(server, path, data, headers, min(30.0, max(deadline.left(), 0.1)))
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(max(deadline.left(), 0))
    if worker.is_alive():
        raise deadline.error()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["body"]


def _fetch(server: str, path: str, data: bytes | None, headers: dict | None, timeout: float) -> bytes:
    try:
        req = urllib.request.Request(server.rstrip("/") + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            body = response.read(MAX_ANSWER + 1)
        if declared.isdigit() and len(body) < int(declared):
            raise http.client.IncompleteRead(body[:0], int(declared) - len(body))
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(64 * 1024).decode(errors="replace")
        except (OSError, http.client.HTTPException):
            body = ""
        raise ClientError(_explain_http_error(exc.code, body)) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise ClientError(f"Cannot reach ComfyUI at {server} ({getattr(exc, 'reason', exc)}). Is it running? "
                          "Start it with `python main.py --listen 127.0.0.1 --port 8188` or pass --server.") from None
    except (http.client.HTTPException, OSError, ValueError) as exc:
        raise ClientError(f"The answer from {server} to {path.split('?')[0]} is not valid HTTP "
                          f"({type(exc).__name__}: {str(exc)[:200]}). Is --server a ComfyUI server?") from None
    if len(body) > MAX_ANSWER:
        raise ClientError(f"The answer from {server} to {path.split('?')[0]} is larger than {MAX_ANSWER} bytes.")
    return body


def _explain_http_error(code: int, body: str) -> str:
    """ComfyUI's refusal (HTTP 400 with `error` and `node_errors`) as readable lines, whatever its shape."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return f"ComfyUI answered HTTP {code}: {body[:500]}"
    error = data.get("error")
    message = error.get("message", "") if isinstance(error, dict) else error
    lines = [f"ComfyUI refused the workflow (HTTP {code}): {str(message or '')[:500]}"]
    node_errors = data.get("node_errors")
    if isinstance(node_errors, dict):
        for node_id, err in node_errors.items():
            errors = err.get("errors") if isinstance(err, dict) else None
            if not isinstance(errors, list):
                lines.append(f"  node {node_id}: {str(err)[:300]}")
                continue
            for e in errors:
                text = f"{e.get('message')}: {e.get('details')}" if isinstance(e, dict) else str(e)
                lines.append(f"  node {node_id} ({err.get('class_type')}): {text[:300]}")
    elif node_errors:
        lines.append(f"  {str(node_errors)[:500]}")
    return "\n".join(lines)


def parse_answer(raw: bytes, what: str, expect: type = dict):
    """ComfyUI's answer as JSON of the expected type, or one readable error naming the request."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        start = raw[:80].decode(errors="replace").strip()
        raise ClientError(f"ComfyUI's answer to {what} is not JSON (it starts {start!r}). Is --server a ComfyUI "
                          "server?") from None
    except RecursionError:
        raise ClientError(f"ComfyUI's answer to {what} is JSON nested too deeply to read.") from None
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


def get_json(server: str, path: str, deadline: Deadline | None = None):
    return parse_answer(_request(server, path, deadline=deadline), f"GET {path}")


def upload_image(server: str, path: str | Path, deadline: Deadline | None = None) -> str:
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
                                   {"Content-Type": f"multipart/form-data; boundary={boundary}"}, deadline),
                          "the upload")
    name = field(answer, "name", str, "the upload")
    subfolder = answer.get("subfolder") or ""
    if not isinstance(subfolder, str):
        raise ClientError(f"ComfyUI's answer to the upload has a subfolder that is not text: {subfolder!r:.80}")
    return f"{subfolder}/{name}" if subfolder else name


def apply_overrides(workflow: dict, settings: list[str], inputs_of=None) -> dict:
    """--set NODE.INPUT=VALUE (VALUE parsed as JSON when it can be, else taken as text). With `inputs_of`, an
    input the node type does not have is refused: `inputs_of(class_type)` gives its inputs (None: the server
    cannot say, then only the inputs the workflow already sets are taken)."""
    for item in settings:
        target, sep, raw = item.partition("=")
        node, dot, name = target.partition(".")
        if not sep or not dot or not name or node not in workflow:
            raise ClientError(f"--set {item!r}: use NODE_ID.INPUT=VALUE with a node id of this workflow "
                              f"({', '.join(workflow)}).")
        class_type = workflow[node]["class_type"]
        known = inputs_of and (inputs_of(class_type) or set(workflow[node]["inputs"]))
        if known and name not in known:
            raise ClientError(f"--set {item!r}: node {node} ({class_type}) has no input {name!r}; its inputs are "
                              f"{', '.join(sorted(known))}.")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = raw
        workflow[node]["inputs"][name] = value
    return workflow


def node_inputs(server: str, class_type: str, deadline: Deadline | None = None) -> set[str] | None:
    """The input names ComfyUI declares for a node type (GET /object_info/<type>); None if it cannot say."""
    try:
        info = get_json(server, f"/object_info/{urllib.parse.quote(class_type)}", deadline).get(class_type)
    except ClientError:
        return None
    inputs = info.get("input") if isinstance(info, dict) else None
    if not isinstance(inputs, dict):
        return None
    names = set()
    for group in ("required", "optional"):
        if isinstance(inputs.get(group), dict):
            names |= set(inputs[group])
    return names or None


def queue(server: str, workflow: dict, client_id: str, deadline: Deadline | None = None) -> str:
    data = json.dumps({"prompt": workflow, "client_id": client_id}).encode()
    answer = parse_answer(_request(server, "/prompt", data, {"Content-Type": "application/json"}, deadline),
                          "POST /prompt")
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


def wait(server: str, prompt_id: str, client_id: str, workflow: dict, deadline: Deadline | None = None,
         show=print) -> dict:
    """Stream progress until the prompt finishes (or the deadline passes); returns its /history entry."""
    deadline = deadline or Deadline(3600)
    try:
        import websocket  # websocket-client
    except ImportError:
        websocket = None
        show("(install websocket-client for live progress; polling /history)")
    ws = None
    if websocket is not None:
        try:
            ws = websocket.WebSocket()
            ws.connect(server.replace("http", "ws", 1).rstrip("/") + f"/ws?clientId={client_id}",
                       timeout=max(0.1, min(10.0, deadline.left())))
            ws.settimeout(2)
        except (OSError, websocket.WebSocketException) as exc:
            show(f"(no live progress: the websocket did not open ({exc}); polling /history)")
            ws = None
    try:
        while deadline.left() > 0:
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
            entry = finished_entry(get_json(server, f"/history/{prompt_id}", deadline), prompt_id)
            if entry is not None:
                return entry
            if ws is None:
                time.sleep(max(0.0, min(1.0, deadline.left())))
        raise deadline.error()
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


def output_path(out: Path, node_id: str, filename: str, taken: set[Path] | None = None) -> Path:
    """Where an output of `node_id` named by the server is saved: a plain name inside `out`, never elsewhere
    (a server's file name may hold `../` or an absolute path), and never one of the paths in `taken` (two outputs
    whose names sanitise alike are numbered: name_2.png, name_3.png...)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{node_id}_{Path(str(filename)).name}").lstrip(".") or "output"
    target = (out / base[:200]).resolve()
    if target.parent != out.resolve():
        raise ClientError(f"Refusing to save the server's output {filename!r} outside {out}.")
    stem, suffix, number = target.stem, target.suffix, 1
    while taken is not None and target in taken:
        number += 1
        target = target.with_name(f"{stem}_{number}{suffix}")
    return target


def listed(produced: dict, key: str, node_id: str) -> list:
    """The list of outputs of one kind that a node produced ([] if none); another shape is one readable error."""
    items = produced.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise ClientError(f"ComfyUI listed the {key} of node {node_id} as {items!r:.80}, not a list: this client "
                          "does not understand this server version.")
    return items


def download_outputs(server: str, entry: dict, out_dir: str | Path, deadline: Deadline | None = None) -> list[Path]:
    """Save every image and text output of the entry in `out_dir` under sanitised, distinct names; returns the
    paths."""
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
        for image in listed(produced, "images", node_id):
            if not (isinstance(image, dict) and isinstance(image.get("filename"), str) and image["filename"]):
                raise ClientError(f"ComfyUI listed an output image of node {node_id} without a file name.")
            query = urllib.parse.urlencode({k: str(image.get(k, "")) for k in ("filename", "subfolder", "type")})
            target = output_path(out, node_id, image["filename"], set(saved))
            saved.append(write_output(target, _request(server, f"/view?{query}", deadline=deadline)))
        for i, text in enumerate(listed(produced, "text", node_id)):
            data = (text if isinstance(text, str) else json.dumps(text)).encode()
            target = output_path(out, node_id, f"text_{i}.txt" if i else "text.txt", set(saved))
            saved.append(write_output(target, data))
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
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds the whole run may take, uploads and downloads included (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if not args.timeout > 0:
            raise ClientError(f"--timeout must be a positive number of seconds, got {args.timeout}.")
        deadline = Deadline(args.timeout)
        if not Path(args.workflow).is_file():  # a FIFO would block the read
            raise ClientError(f"Cannot read workflow {args.workflow}: not a regular file.")
        try:
            workflow = json.loads(Path(args.workflow).read_text())
        except (OSError, ValueError) as exc:
            raise ClientError(f"Cannot read workflow {args.workflow}: {exc}") from exc
        except RecursionError:
            raise ClientError(f"Cannot read workflow {args.workflow}: its JSON is nested too deeply.") from None
        check_workflow(workflow, args.workflow)
        if args.image:
            name = upload_image(args.server, args.image, deadline)
            for node in workflow.values():
                if node["class_type"] == "LoadImage":
                    node["inputs"]["image"] = name
        apply_overrides(workflow, args.set, lambda class_type: node_inputs(args.server, class_type, deadline))
        client_id = uuid.uuid4().hex
        prompt_id = queue(args.server, workflow, client_id, deadline)
        print(f"queued {prompt_id}")
        entry = wait(args.server, prompt_id, client_id, workflow, deadline)
        problem = failure_message(entry)
        for path in download_outputs(args.server, entry, args.out, deadline):
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
