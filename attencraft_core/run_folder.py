"""One training run per output folder: a lock held for the run's life, and the files an earlier run left there
(removed only when the user asks to replace them)."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import time
from pathlib import Path

from safetensors import safe_open

from .errors import AttenCraftError

LOCK = "run.lock"
CONCEPT_SET_FORMAT = "attencraft-concepts/1"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(folder):` holds `folder/run.lock` (pid, host, start time) or refuses with the holder's name.

    A lock left by a process of this machine that no longer runs is taken over.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.held = False

    def __enter__(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # its run was killed: the lock is stale
                    continue
                raise AttenCraftError(
                    f"{self.path.parent} is in use by another training run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}): wait for it to finish or use another "
                    f"output folder. If no run uses it, delete {self.path}.") from None
            except OSError as exc:
                raise AttenCraftError(f"Cannot create {self.path} ({exc.strerror or exc}): choose a folder you "
                                      "can write to.") from exc
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise AttenCraftError(f"Could not take the lock {self.path}; delete it if no run uses the folder.")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def is_concept_set(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == CONCEPT_SET_FORMAT
    except Exception:  # not a safetensors file, or damaged: not ours either way
        return False


SNAPSHOT = re.compile(r"(.+)_step(\d{6,})")


def is_snapshot(path: str | Path) -> bool:
    """Whether a file is named as a run's step snapshot (<name>_step<N>.safetensors)."""
    return SNAPSHOT.fullmatch(Path(path).stem) is not None


def snapshot_name(name: str, step: int) -> str:
    return f"{name}_step{step:06d}.safetensors"


def snapshots(folder: str | Path, name: str) -> list[Path]:
    """The step snapshots of run `name` in `folder`, oldest first."""
    found = []
    for path in Path(folder).glob("*.safetensors"):
        match = SNAPSHOT.fullmatch(path.stem)
        if match and match.group(1) == name:
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found)]


def earlier_run_files(folder: str | Path) -> list[Path]:
    """What a training run left in `folder`: each concept set (final or step snapshot) with every file named
    after it (LoRA, embeddings, masks, loss curve, log, previews) and the resumable checkpoint. Other
    files are not counted."""
    folder = Path(folder)
    found = {p for p in (folder / "checkpoint.safetensors", folder / "checkpoint.pt") if p.is_file()}
    for concept_set in folder.glob("*.safetensors"):
        if not is_concept_set(concept_set):
            continue
        found.add(concept_set)
        snapshot = SNAPSHOT.fullmatch(concept_set.stem)
        name = glob.escape(snapshot.group(1) if snapshot else concept_set.stem)
        for pattern in (f"{name}_lora_kohya.safetensors", f"{name}_lora_diffusers.safetensors", f"{name}_c*.safetensors",
                        f"{name}_mask_*.png", f"{name}_loss.png", f"{name}_train.json", f"{name}_preview_*.png"):
            found.update(folder.glob(pattern))
    return sorted(found)

