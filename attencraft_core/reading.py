"""Reading files that come from outside: only regular files are opened (a FIFO, socket or device would block or
never end), JSON files must hold what their reader expects."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import AttenCraftError


def file_kind(path: str | Path) -> str | None:
    """None for a regular file (links followed), "missing", or what else it is ("a folder", "a FIFO"...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def is_regular_file(path: str | Path) -> bool:
    return file_kind(path) is None


def require_regular_file(path: str | Path, what: str = "File") -> Path:
    """`path` if it is a regular file; else one error saying what it is (nothing is opened, so nothing blocks)."""
    kind = file_kind(path)
    if kind == "missing":
        raise AttenCraftError(f"{what} {str(path)!r} does not exist.")
    if kind is not None:
        raise AttenCraftError(f"{what} {str(path)!r} is {kind}, not a regular file: AttenCraft reads only regular "
                              "files. Remove it or give another path.")
    return Path(path)


def refuse_special_file(path: str | Path, what: str = "File") -> None:
    """Refuse `path` if something other than a regular file stands there (a missing path is fine)."""
    if file_kind(path) not in (None, "missing"):
        require_regular_file(path, what)


def check_header_size(path: Path, limit: int, what: str) -> None:
    """Refuse a safetensors file whose declared header is larger than `limit` bytes, before reading it."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise AttenCraftError(f"{path.name} is too short to be a safetensors file ({len(head)} bytes).")
    size = int.from_bytes(head, "little")
    if size > limit:
        raise AttenCraftError(f"{path.name} declares a {size} byte header (at most {limit} read): not {what}.")


def read_json_object(path: str | Path, what: str = "") -> dict:
    """A JSON file that must hold an object (a config, an index); one error naming the file otherwise."""
    path = require_regular_file(path, what or "JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise AttenCraftError(f"Cannot read {path}: {exc}. Is the folder complete?") from exc
    if not isinstance(data, dict):
        raise AttenCraftError(f"{path} holds a JSON {type(data).__name__}, not an object: the file is damaged. "
                              "Re-copy it.")
    return data
