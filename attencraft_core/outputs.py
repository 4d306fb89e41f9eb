"""Writing results to disk: safe file names, atomic writes, the mask folder layout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from .errors import AttenCraftError
from .images import mask_to_image, overlay


MAX_NAME = 64  # characters of a slug; a longer one is cut and gets a short hash, so names stay distinct


def safe_name(text: str) -> str:
    """A short file-name-safe slug of `text` (letters, digits, - and _; at most MAX_NAME characters)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "concept"
    if len(slug) > MAX_NAME:
        slug = f"{slug[:MAX_NAME - 9]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return slug


def ensure_out_dir(path: str | Path) -> Path:
    """Create the output folder, or say clearly why it cannot be written."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise AttenCraftError(f"Output folder {str(out)!r} is not writable ({exc.strerror or exc}). "
                              "Choose a folder you can write to.") from exc
    return out


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (other threads may be writing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: Path, exc: OSError) -> AttenCraftError:
    """One readable error for a failed write (disk full, read-only folder...); the previous file is kept."""
    return AttenCraftError(f"Could not write {path} ({exc.strerror or exc}); any previous version of it is kept. "
                           "Free disk space or choose a folder you can write to.")


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) then rename onto `path`: readers never see a half-written file. The file gets the
    permissions a plain open() would give it (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete temporary files that an interrupted atomic_write of `path` left behind (a kill -9 mid-write)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def write_json(path: str | Path, data) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, allow_nan=False)))


def save_image(path: str | Path, image) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_mask_outputs(out_dir: str | Path, image, result) -> dict:
    """mask_<i>_<word>.png per concept, overlay.png and masks.json in `out_dir`; returns the JSON written."""
    out = ensure_out_dir(out_dir)
    files = []
    for i, (concept, mask) in enumerate(zip(result.concepts, result.masks)):
        name = f"mask_{i}_{safe_name(concept.word)}.png"
        save_image(out / name, mask_to_image(mask))
        files.append(name)
    save_image(out / "overlay.png", overlay(image, result.masks))
    summary = result.summary()
    for entry, name in zip(summary["concepts"], files):
        entry["mask_file"] = name
    summary["overlay_file"] = "overlay.png"
    write_json(out / "masks.json", summary)
    return summary
