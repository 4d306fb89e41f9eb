"""Promises the repository makes: CI runs README's test command; the core never imports ComfyUI."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    command = ci_lines[-1].strip()
    assert command.startswith("python -m pytest")
    assert command in (ROOT / "README.md").read_text()


def test_core_never_imports_comfyui():
    for path in (ROOT / "attencraft_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in {"comfy", "comfy_api", "comfy_extras", "folder_paths"}
                           for n in names), f"{path} imports ComfyUI"
