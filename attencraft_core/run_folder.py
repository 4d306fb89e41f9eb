"""One training run per output folder: a lock held for the run's life, the manifest of the files runs wrote
there, and the files an earlier run left (removed, by the manifest, only when the user asks to replace them)."""

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
from .reading import is_regular_file, read_json_object

LOCK = "run.lock"
MANIFEST = "attencraft_files.json"
MANIFEST_FORMAT = "attencraft-files/1"
CHECKPOINT_NAMES = ("checkpoint.safetensors", "checkpoint.pt")
CONCEPT_SET_FORMAT = "attencraft-concepts/1"


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with that pid runs (or may: one we may not signal)."""
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
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not process_alive(holder["pid"]):
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
        if not is_regular_file(self.path):  # a FIFO would block the read: no holder can be named
            return {}
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
    if not is_regular_file(path):  # a FIFO would block the read
        return False
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
        if match and match.group(1) == name and is_regular_file(path):
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found)]


class RunManifest:
    """`folder/attencraft_files.json`: the names of the files the runs in `folder` wrote, rewritten atomically
    after each write. Replacing a run deletes these files and nothing else."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST

    def names(self) -> list[str]:
        """The recorded names (plain file names only: an entry with a path in it is never followed)."""
        if not self.path.exists():
            return []
        data = read_json_object(self.path, "The run manifest")
        files = data.get("files")
        if data.get("format") != MANIFEST_FORMAT or not isinstance(files, list):
            raise AttenCraftError(f"{self.path} is not an AttenCraft run manifest ({MANIFEST_FORMAT}). Delete it "
                                  "(no file is removed then: delete the earlier run's files by hand) or use another "
                                  "output folder.")
        return [n for n in files if isinstance(n, str) and is_plain_name(n)]

    def files(self) -> list[Path]:
        """The recorded files that are still there."""
        return [self.folder / n for n in self.names() if is_regular_file(self.folder / n)]

    def _write(self, names: list[str]) -> None:
        from .outputs import write_json  # outputs imports images (PIL); the nodes import this module at start

        write_json(self.path, {"format": MANIFEST_FORMAT, "files": names})

    def add(self, *paths: str | Path) -> None:
        names = self.names()
        new = [Path(p).name for p in paths if Path(p).name not in names]
        if new:
            self._write(names + new)

    def discard(self, *paths: str | Path) -> None:
        gone = {Path(p).name for p in paths}
        names = self.names()
        if gone & set(names):
            self._write([n for n in names if n not in gone])


def is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def earlier_run_files(folder: str | Path) -> list[Path]:
    """What a training run left in `folder`: the files its manifest lists and the resumable checkpoint, and, from
    versions that kept no manifest, each concept set (final or step snapshot) with every file named after it.
    This says whether a folder is in use; only `run_files` are ever deleted."""
    folder = Path(folder)
    found = set(run_files(folder)) | {folder / n for n in CHECKPOINT_NAMES if is_regular_file(folder / n)}
    for concept_set in folder.glob("*.safetensors"):
        if not is_concept_set(concept_set):
            continue
        found.add(concept_set)
        snapshot = SNAPSHOT.fullmatch(concept_set.stem)
        name = glob.escape(snapshot.group(1) if snapshot else concept_set.stem)
        for pattern in (f"{name}_lora_kohya.safetensors", f"{name}_lora_diffusers.safetensors", f"{name}_c*.safetensors",
                        f"{name}_mask_*.png", f"{name}_loss.png", f"{name}_train.json", f"{name}_preview_*.png"):
            found.update(p for p in folder.glob(pattern) if is_regular_file(p))
    return sorted(found)


def run_files(folder: str | Path) -> list[Path]:
    """The files that runs in `folder` wrote, by its manifest: what replacing the run deletes."""
    return RunManifest(folder).files()


def other_files(folder: str | Path) -> list[Path]:
    """The visible files in `folder` that no run wrote (the user's own): kept when a run is replaced."""
    folder = Path(folder)
    ours = {p.name for p in run_files(folder)} | {MANIFEST, LOCK}
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in ours and not p.is_dir())
