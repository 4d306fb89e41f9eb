"""The resumable training state on disk, without pickle: tensors in one safetensors file, everything else
(step, history, options, RNG states, optimizer settings) as JSON in that file's metadata.

A run folder is something people copy and share, so nothing in it may run code when it is read; the
pickle-based `checkpoint.pt` of earlier versions is refused, never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import AttenCraftError
from .outputs import atomic_write, remove_stale_temporaries
from .validation import first_non_finite

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
FORMAT = "attencraft-checkpoint/3"  # 3: learned concept rows of their own, scaler state


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as (tensors named `optimizer.<param>.<key>`, the JSON-ready rest)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    """The inverse of optimizer_to_flat: a state_dict that `Optimizer.load_state_dict` takes."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            index, key = name[len("optimizer."):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Write tensors + JSON-ready `info` atomically to `path` (a .safetensors file)."""
    metadata = {"format": FORMAT, "info": json.dumps(info, allow_nan=False)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    remove_stale_temporaries(path)  # left by a run killed while writing its checkpoint
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a checkpoint written by save_checkpoint; a clear error for anything else.

    Every floating tensor must be finite: a run that diverged is not resumed.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AttenCraftError(f"{path} is not a readable AttenCraft checkpoint ({exc}). Delete it and train "
                              "without --resume.") from exc
    if str(metadata.get("format", "")).startswith("attencraft-checkpoint/") and metadata["format"] != FORMAT:
        raise AttenCraftError(f"{path} was written by an earlier version of AttenCraft, whose training state this "
                              "version cannot continue. Train again without --resume (the finished concept sets "
                              "of that version still load).")
    if metadata.get("format") != FORMAT:
        raise AttenCraftError(f"{path} is not an AttenCraft checkpoint (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r}). Delete it and train without --resume.")
    try:
        info = json.loads(metadata["info"], parse_constant=_refuse_constant)
    except (KeyError, ValueError) as exc:
        raise AttenCraftError(f"{path} has no valid training state in its metadata ({exc}). Delete it and train "
                              "without --resume.") from exc
    if not isinstance(info, dict):
        raise AttenCraftError(f"{path}: its training state is not a JSON object. Delete it and train without "
                              "--resume.")
    name = first_non_finite(tensors.items())
    if name is not None:
        raise AttenCraftError(f"{path} holds non-finite values in {name} (the run diverged): resume from "
                              "an earlier copy, or train again without --resume.")
    return tensors, info


def refuse_legacy(folder: Path) -> None:
    """Refuse the pickle-based checkpoint of earlier versions: loading it could run code."""
    legacy = folder / LEGACY_CHECKPOINT
    if legacy.is_file() and not (folder / CHECKPOINT).is_file():
        raise AttenCraftError(f"{legacy} is an old-format (pickle) checkpoint, which is never loaded because a "
                              "crafted one can run code. Train again without --resume, or in a new folder.")


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name}")

