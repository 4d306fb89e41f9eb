"""What a ComfyUI user sees of the nodes' work: errors worded for node inputs, progress with ETA and previews."""

import ast
from pathlib import Path

import pytest
from PIL import Image

from comfy_support import ROOT, load_pack

load_pack()
from attencraft_pack.attencraft_core.errors import AttenCraftError  # noqa: E402
from attencraft_pack.nodes.comfy_progress import ComfyProgress, format_seconds  # noqa: E402
from attencraft_pack.nodes.node_errors import (FLAG, FOR_NODES, AttenCraftNodeError, for_nodes,  # noqa: E402
                                               node_errors)


def core_messages() -> list[str]:
    """Every string in the core that may reach a user through an error (the command line's own are skipped)."""
    texts = []
    for path in sorted((ROOT / "attencraft_core").glob("*.py")):
        if path.name in ("cli.py", "options.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                texts.append(node.value)
    return texts


def test_every_command_line_flag_in_a_core_message_has_node_wording():
    flagged = [t for t in core_messages() if FLAG.search(t)]
    assert flagged, "the scan found no message with a flag: is it still reading the core?"
    for text in flagged:
        assert "--" not in for_nodes(text), text
        for flag in FLAG.findall(text):
            assert any(flag in phrase for phrase in FOR_NODES), f"{flag} has no node wording in FOR_NODES"


def test_mask_advice_names_the_extract_nodes_inputs():
    from attencraft_pack.attencraft_core.mask_math import AMBIGUITY_ADVICE
    text = for_nodes(AMBIGUITY_ADVICE)
    assert "another seed or t_min/t_max range, a lower threshold" in text


def test_node_errors_have_a_readable_type_and_no_core_traceback():
    @node_errors
    def execute(cls, value):
        if value == "bad":
            raise AttenCraftError("Try another --seed.")
        if value == "bug":
            raise KeyError("not ours")
        return value

    assert execute(None, "ok") == "ok"
    with pytest.raises(AttenCraftNodeError, match="^Try another seed.$") as caught:
        execute(None, "bad")
    kind = type(caught.value)
    assert f"{kind.__module__}.{kind.__qualname__}" == "AttenCraft.AttenCraftNodeError"  # ComfyUI's error type
    assert caught.value.__cause__ is None and caught.value.__context__ is None  # the core's frames are let go
    with pytest.raises(KeyError):  # other failures are not disguised
        execute(None, "bug")


class FakeBar:
    def __init__(self, total):
        self.total, self.updates = total, []

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total, preview))


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_progress_shows_each_phase_with_an_eta_and_honours_cancel():
    bars, texts, clock, cancelled = [], [], Clock(), []

    def check_cancel():
        if cancelled:
            raise InterruptedError("cancelled")

    progress = ComfyProgress(lambda total: bars.append(FakeBar(total)) or bars[-1], texts.append, check_cancel,
                             clock=clock, text_every=0)
    progress("converting the model", 0, 3)
    progress("converting the model", 3, 3)
    progress("training", 0, 100)
    clock.now = 20.0
    progress("training", 10, 100, loss="0.1234")
    assert [b.total for b in bars] == [3, 100]
    assert texts[-1] == "training: 10/100  ETA 3:00  loss 0.1234"
    assert bars[1].updates[-1] == (10, 100, None)
    progress.show_preview(10, Image.new("RGBA", (8, 8)))
    kind, image, size = bars[1].updates[-1][2]
    assert kind == "JPEG" and image.mode == "RGB" and size == 512 and bars[1].updates[-1][0] == 10
    cancelled.append(True)
    with pytest.raises(InterruptedError):
        progress("training", 11, 100)
    assert format_seconds(3725) == "1:02:05"


def test_text_is_throttled_but_the_last_step_always_shows():
    texts, clock = [], Clock()
    progress = ComfyProgress(FakeBar, texts.append, lambda: None, clock=clock, text_every=1.0)
    for step in range(1, 6):
        progress("training", step, 5)
    assert texts == ["training: 1/5", "training: 5/5"]


def test_the_nodes_module_uses_these_pieces():
    source = Path(ROOT / "nodes" / "attencraft_nodes.py").read_text()
    assert source.count("@node_errors") == 4  # every node's execute
