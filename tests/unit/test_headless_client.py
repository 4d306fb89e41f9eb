"""The headless client (scripts/run_workflow.py) against hostile or broken server answers: one readable error
and exit status each, never a traceback, and nothing written outside --out. The server is a stand-in for
ComfyUI's HTTP answers (the real server is exercised in test_comfyui_server.py)."""

import importlib.util
import json
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

    def request(server, path, data=None, headers=None, timeout=30):
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
