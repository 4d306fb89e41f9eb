"""Writing results to disk: safe file names, atomic writes, the mask folder layout."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from .errors import AttenCraftError
from .images import mask_to_image, overlay
from .reading import is_regular_file
from .run_folder import process_alive


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


def write_error(path: Path, exc: Exception, size: int | None = None) -> AttenCraftError:
    """One readable error for a failed write (disk full, read-only folder...); the previous file is kept."""
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
        return disk_full_error(path, size)
    return AttenCraftError(f"Could not write {path} ({getattr(exc, 'strerror', None) or exc}); any previous version "
                           "of it is kept. Free disk space or choose a folder you can write to.")


def disk_full_error(path: Path, size: int | None) -> AttenCraftError:
    free = shutil.disk_usage(path.parent).free
    need = f"about {megabytes(size)} needed, " if size else ""
    return AttenCraftError(f"No space left on device in {path.parent} to write {path.name} ({need}{megabytes(free)} "
                           "free): free disk space there or choose another folder. Any previous version of the file "
                           "(the last good checkpoint included) is kept.")


def megabytes(size: int) -> str:
    return f"{size / 2 ** 20:.1f} MB"


SAFETY_MARGIN = 1 << 20  # bytes beyond a write's own size that must stay free


def atomic_write(path: str | Path, write, size: int | None = None) -> Path:
    """Call write(tmp_path) then rename onto `path`: readers never see a half-written file. The file gets the
    permissions a plain open() would give it (0666 less the umask), not the temporary file's 0600. With `size`
    (bytes it will take), a disk without that much room is refused before anything is written."""
    path = Path(path)
    if size is not None and shutil.disk_usage(path.parent).free < size + SAFETY_MARGIN:
        raise disk_full_error(path, size + SAFETY_MARGIN)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc, size) from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        raise write_error(path, exc, size) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Tensors (moved to the CPU, contiguous) and text metadata as one safetensors file, written atomically; the
    room it needs is checked first."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(metadata or {})) + 4096
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), size)


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete the temporary files that an interrupted atomic_write of `path` left behind (a kill -9 mid-write):
    those of processes of this machine that no longer run. A write in progress in another process is left alone."""
    path = Path(path)
    name = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp")  # see atomic_write
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = name.fullmatch(stale.name)
        if match and not (match.group(1) and process_alive(int(match.group(1)))) and is_regular_file(stale):
            stale.unlink(missing_ok=True)


def write_json(path: str | Path, data) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, allow_nan=False)))


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str | Path) -> str:
    """The format a file name's suffix names (PNG, JPEG, WebP); any other suffix is an error."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise AttenCraftError(f"{Path(path).name}: AttenCraft writes images as {', '.join(IMAGE_FORMATS)}; name "
                              "the file with one of these suffixes.")
    return IMAGE_FORMATS[suffix]


def save_image(path: str | Path, image) -> Path:
    """Write an image in the format its suffix names (PNG, JPEG at quality 95, WebP), atomically."""
    kind = image_format(path)
    extra = {"quality": 95} if kind == "JPEG" else {}
    return atomic_write(path, lambda tmp: image.convert("RGB" if kind == "JPEG" else image.mode).save(
        tmp, format=kind, **extra))


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
