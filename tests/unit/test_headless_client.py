"""The headless client (scripts/run_workflow.py) against hostile or broken server answers: one readable error
and exit status each, never a traceback, and nothing written outside --out. The server is a stand-in for
ComfyUI's HTTP answers (the real server is exercised in test_comfyui_server.py)."""

import importlib.util
import json
import socket
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("run_workflow", ROOT / "scripts" / "run_workflow.py")
client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(client)

WORKFLOW = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
DONE = {"status": {"completed": True, "status_str": "success", "messages": []}}


def fake_server(monkeypatch, answers: dict):
    """Serve `answers` (path prefix -> bytes or JSON-able) in place of ComfyUI; websocket off."""
    monkeypatch.setitem(__import__("sys").modules, "websocket", None)

    def request(server, path, data=None, headers=None, deadline=None):
        for prefix, answer in answers.items():
            if path.startswith(prefix):
                return answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        raise AssertionError(f"unexpected request {path}")
    monkeypatch.setattr(client, "_request", request)


def run(tmp_path, *extra):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WORKFLOW))
    image = tmp_path / "in.png"
    image.write_bytes(b"\x89PNG fake")
    return client.main([str(wf), "--image", str(image), "--out", str(tmp_path / "out"), "--timeout", "5", *extra])


HOSTILE_ANSWERS = [
    ({"/upload/image": b"<html>502 Bad Gateway</html>"}, "answer to the upload is not JSON"),
    ({"/upload/image": [1, 2]}, "answer to the upload is a JSON list"),
    ({"/upload/image": {"name": 5}}, "has no str 'name'"),
    ({"/upload/image": {"name": "x.png", "subfolder": ["a"]}}, "subfolder that is not text"),
    ({"/upload/image": {"name": "x.png"}, "/prompt": {}}, "answer to POST /prompt has no str 'prompt_id'"),
    ({"/upload/image": {"name": "x.png"}, "/prompt": b"\xff\xfe"}, "answer to POST /prompt is not JSON"),
    ({"/upload/image": {"name": "x.png"}, "/prompt": {"prompt_id": "p"}, "/history/": [None]},
     "GET /history/p is a JSON list"),
    ({"/upload/image": {"name": "x.png"}, "/prompt": {"prompt_id": "p"}, "/history/": {"p": "done"}},
     "not an object for the prompt"),
    ({"/upload/image": {"name": "x.png"}, "/prompt": {"prompt_id": "p"}, "/history/": {"p": {"status": 7}}},
     "status or outputs of the wrong shape"),
    ({"/upload/image": {"name": "x.png"}, "/prompt": {"prompt_id": "p"},
      "/history/": {"p": {**DONE, "outputs": {"9": {"images": [{"subfolder": ""}]}}}}},
     "output image of node 9 without a file name"),
]


@pytest.mark.parametrize("answers,expected", HOSTILE_ANSWERS, ids=[e for _, e in HOSTILE_ANSWERS])
def test_a_broken_server_answer_is_one_readable_error(answers, expected, monkeypatch, tmp_path, capsys):
    fake_server(monkeypatch, answers)
    assert run(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["../../escape.txt", "/tmp/abs_escape.txt", "..", "sub/../../x.png", ".hidden"])
def test_output_names_from_the_server_stay_inside_out(name, monkeypatch, tmp_path):
    history = {"p": {**DONE, "outputs": {"9": {"images": [{"filename": name, "subfolder": "", "type": "output"}],
                                              "text": ["hello"]}}}}
    fake_server(monkeypatch, {"/upload/image": {"name": "x.png"}, "/prompt": {"prompt_id": "p"},
                              "/history/": history, "/view": b"PIXELS"})
    assert run(tmp_path) == 0
    out = (tmp_path / "out").resolve()
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("wf.json", "in.png"))
    assert written and all(p.resolve().parent == out for p in written), written
    assert not Path("/tmp/abs_escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    assert b"PIXELS" in [p.read_bytes() for p in written]


@pytest.mark.parametrize("message", [b"\x00\x01binary preview", "not json", "[1, 2]", '{"type": 3}', '{"data": {}}'])
def test_odd_websocket_messages_are_skipped(message):
    assert client.read_event(message) is None
    assert client.read_event('{"type": "progress", "data": {"value": 1, "max": 2}}') == (
        "progress", {"value": 1, "max": 2})


@pytest.mark.parametrize("workflow,expected", [
    ([1, 2], "not an API-format workflow"),
    ({}, "not an API-format workflow"),
    ({"1": {"inputs": {}}}, "node '1' has no class_type"),
    ({"nodes": [], "links": []}, "UI-format workflow"),
])
def test_a_bad_workflow_file_is_one_readable_error(workflow, expected, tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(workflow))
    assert client.main([str(wf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_odd_status_messages_still_give_a_failure_message():
    entry = {"status": {"status_str": "error", "messages": [["execution_error"], "junk",
                                                             ["execution_error", {"node_id": "5", "node_type": "T",
                                                                                  "exception_message": "boom"}]]}}
    assert client.failure_message(entry) == "node 5 (T) failed: boom"


# ---- a server that breaks HTTP itself: a raw socket on the loopback ----------------------------------------------

class RawServer:
    """Answers every connection on 127.0.0.1 with `reply(conn)`: raw bytes, however broken. Bounded: at most 20
    connections, and it stops with the test."""

    def __init__(self, reply):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply, self.stopped = reply, threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        for _ in range(20):
            while not self.stopped.is_set():
                try:
                    conn, _ = self.sock.accept()
                    break
                except socket.timeout:
                    continue
            else:
                return
            with conn:
                conn.settimeout(2)
                try:
                    read_request(conn)
                    self.reply(conn, self.stopped)
                    conn.shutdown(socket.SHUT_WR)  # a clean end of the answer, not a reset
                except OSError:
                    pass


    def close(self):
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def read_request(conn):
    """Read one whole HTTP request (headers, then Content-Length bytes of body), so closing resets nothing."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def send(raw: bytes):
    return lambda conn, stopped: conn.sendall(raw)


def trickle(conn, stopped):
    """One byte every 1.5 s, for at most 40 s."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 40:
        if stopped.wait(1.5):
            return
        conn.sendall(bytes([byte]))


def answer(status: str, body: bytes, headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}"
            f"Connection: close\r\n\r\n").encode() + body


BROKEN_HTTP = [
    ("bad status line", send(b"NONSENSE 200\r\n\r\n"), "is not valid HTTP"),
    ("short body", send(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"name\""), "is not valid HTTP"),
    ("70 KB header line", send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"), "is not valid HTTP"),
    ("150 headers", send(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"),
     "is not valid HTTP"),
    ("400 with a string error", send(answer("400 Bad Request", b'{"error": "bad prompt", "node_errors": "all"}')),
     "ComfyUI refused the workflow (HTTP 400): bad prompt"),
    ("400 with a list body", send(answer("400 Bad Request", b"[1, 2, 3]")), "ComfyUI answered HTTP 400: [1, 2, 3]"),
    ("400 with odd node errors", send(answer("400 Bad Request",
                                             b'{"error": {"message": "invalid"}, "node_errors": {"3": "broken", '
                                             b'"4": {"errors": ["x", 5]}}}')), "node 3: broken"),
    ("deeply nested JSON", send(answer("200 OK", b"[" * 100_000 + b"]" * 100_000)), "nested too deeply"),
    ("a trickling server", trickle, "did not finish within --timeout 4 s"),
]


@pytest.mark.parametrize("case,reply,expected", BROKEN_HTTP, ids=[c for c, _, _ in BROKEN_HTTP])
def test_broken_http_is_one_readable_error_within_the_timeout(case, reply, expected, tmp_path, capsys):
    server = RawServer(reply)
    try:
        started = time.monotonic()
        code = run(tmp_path, "--server", server.url, "--timeout", "4")
        took = time.monotonic() - started
    finally:
        server.close()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expected in err and "Traceback" not in err, err
    assert took < 4 + 2, took  # the timeout is a deadline for the whole run


def test_a_deeply_nested_workflow_file_is_one_readable_error(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text("[" * 100_000 + "]" * 100_000)
    assert client.main([str(wf), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err, err


@pytest.mark.parametrize("outputs,expected", [
    ({"9": {"images": 5}}, "listed the images of node 9 as 5, not a list"),
    ({"9": {"text": 7}}, "listed the text of node 9 as 7, not a list"),
])
def test_outputs_of_the_wrong_shape_are_one_readable_error(outputs, expected, monkeypatch, tmp_path, capsys):
    fake_server(monkeypatch, {"/upload/image": {"name": "x.png"}, "/prompt": {"prompt_id": "p"},
                              "/history/": {"p": {**DONE, "outputs": outputs}}})
    assert run(tmp_path) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_outputs_whose_names_sanitise_alike_are_all_kept(monkeypatch, tmp_path):
    images = [{"filename": name, "subfolder": "", "type": "output"} for name in ("a b.png", "a?b.png", "a_b.png")]
    views = iter([b"ONE", b"TWO", b"THREE"])
    answers = {"/upload/image": {"name": "x.png"}, "/prompt": {"prompt_id": "p"},
               "/history/": {"p": {**DONE, "outputs": {"9": {"images": images}}}}}
    fake_server(monkeypatch, answers)
    request = client._request
    monkeypatch.setattr(client, "_request", lambda server, path, *a, **k: next(views) if path.startswith("/view")
                        else request(server, path, *a, **k))
    assert run(tmp_path) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["9_a_b.png", "9_a_b_2.png", "9_a_b_3.png"]
    assert sorted(p.read_bytes() for p in out.iterdir()) == [b"ONE", b"THREE", b"TWO"]


OBJECT_INFO = {"SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]},
                                       "optional": {}}}}


def test_set_refuses_an_input_the_node_does_not_have(monkeypatch, tmp_path, capsys):
    fake_server(monkeypatch, {"/upload/image": {"name": "x.png"}, "/object_info/SaveImage": OBJECT_INFO,
                              "/prompt": {"prompt_id": "p"}, "/history/": {"p": DONE}})
    assert run(tmp_path, "--set", "9.nonexistent_field=5") == 2
    err = capsys.readouterr().err
    assert "node 9 (SaveImage) has no input 'nonexistent_field'; its inputs are filename_prefix, images" in err, err
    assert run(tmp_path, "--set", "9.filename_prefix=mine") == 0  # an input the server declares, not yet set


def test_set_falls_back_to_the_workflows_inputs_when_the_server_cannot_say(monkeypatch, tmp_path, capsys):
    fake_server(monkeypatch, {"/upload/image": {"name": "x.png"}, "/object_info/": {"other": 1},
                              "/prompt": {"prompt_id": "p"}, "/history/": {"p": DONE}})
    assert run(tmp_path, "--set", "9.filename_prefix=mine") == 2
    assert "its inputs are images" in capsys.readouterr().err
    assert run(tmp_path, "--set", "9.images=[\"1\", 0]") == 0
