"""The resumable training state on disk, without pickle: tensors in one safetensors file, everything else
(step, history, options, RNG states, optimizer settings) as JSON in that file's metadata.

A run folder is something people copy and share, so nothing in it may run code when it is read; the
pickle-based `checkpoint.pt` of earlier versions is refused, never loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import AttenCraftError
from .outputs import save_safetensors
from .reading import check_header_size, refuse_special_file, require_regular_file
from .validation import MAX_WEIGHT, first_non_finite, first_too_large

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
FORMAT = "attencraft-checkpoint/3"
MAX_HEADER_BYTES = 512 * 2 ** 20  # the metadata holds every step's record: ~100 bytes a step  # 3: learned concept rows of their own, scaler state


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
    return save_safetensors(path, tensors, metadata)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a checkpoint written by save_checkpoint; a clear error for anything else.

    Every floating tensor must be finite: a run that diverged is not resumed.
    """
    path = require_regular_file(path, "Checkpoint")
    try:
        check_header_size(path, MAX_HEADER_BYTES, "an AttenCraft checkpoint")
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, AttenCraftError) as exc:
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
    too_large = first_too_large(((k, v) for k, v in tensors.items() if k.startswith(("lora.", "embeddings"))),
                                MAX_WEIGHT)
    if too_large is not None:
        raise AttenCraftError(f"{path} holds a value of {too_large[1]:.3g} in {too_large[0]} (trained weights stay "
                              f"within +-{MAX_WEIGHT:g}): resume from an earlier copy, or train again without "
                              "--resume.")
    return tensors, info


def refuse_legacy(folder: Path) -> None:
    """Refuse the pickle-based checkpoint of earlier versions: loading it could run code."""
    legacy = folder / LEGACY_CHECKPOINT
    refuse_special_file(folder / CHECKPOINT, "Checkpoint")
    if legacy.is_file() and not (folder / CHECKPOINT).is_file():
        raise AttenCraftError(f"{legacy} is an old-format (pickle) checkpoint, which is never loaded because a "
                              "crafted one can run code. Train again without --resume, or in a new folder.")


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name}")



def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_training_state(tensors: dict[str, torch.Tensor], info: dict, n_concepts: int, steps: int,
                         mask_shape: tuple[int, ...], optimizer: torch.optim.Optimizer) -> None:
    """Check every field a checkpoint holds against the run that resumes it (types, ranges, shapes), before
    the first step: a ValueError names the first field that is wrong. `optimizer` is the run's fresh one: the
    saved state must fit its parameters, and its settings (learning rates included) are never taken from the
    file."""
    step = info.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"its step {step!r} is not a step count")
    if step > steps:
        raise ValueError(f"it is at step {step}, past the {steps} steps asked: raise steps to at least {step} to "
                         "continue it")
    history = info.get("history")
    if not isinstance(history, list) or len(history) != step:
        raise ValueError(f"its history is not a list of {step} steps")
    for i, record in enumerate(history):
        if not (isinstance(record, dict) and record.get("step") == i + 1 and _is_number(record.get("loss"))
                and isinstance(record.get("concepts"), list)
                and all(isinstance(c, int) and 0 <= c < n_concepts for c in record["concepts"])):
            raise ValueError(f"its history entry {i + 1} is not a training step of this run")
    events = info.get("events")
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ValueError("its events are not a list of text lines")
    sampler = info.get("sampler")
    if not (isinstance(sampler, dict) and isinstance(sampler.get("rng"), list) and len(sampler["rng"]) == 3
            and isinstance(sampler.get("scores"), list) and len(sampler["scores"]) == n_concepts):
        raise ValueError("its sampler state does not fit this run")
    scores = tensors.get("scores")
    if scores is None or tuple(scores.shape) != (n_concepts,) or not ((scores >= 0) & (scores <= 1)).all():
        raise ValueError(f"its attention scores are not {n_concepts} numbers in [0, 1]")
    masks = tensors.get("masks")
    if masks is None or tuple(masks.shape) != tuple(mask_shape):
        raise ValueError(f"its masks are of shape {None if masks is None else tuple(masks.shape)}, expected "
                         f"{tuple(mask_shape)}")
    empty = [i for i, m in enumerate(masks) if not m.any()]
    if empty:
        raise ValueError(f"its mask of concept {empty[0]} is empty")
    scaler = info.get("scaler")
    if not isinstance(scaler, dict) or not all(_is_number(v) for v in scaler.values()) or (
            "scale" in scaler and scaler["scale"] <= 0):
        raise ValueError("its gradient-scaler state is not a set of finite numbers")
    saved = info.get("optimizer")
    if not (isinstance(saved, dict) and isinstance(saved.get("param_groups"), list)
            and isinstance(saved.get("scalars"), dict)):
        raise ValueError("its optimizer state is damaged")
    groups = optimizer.param_groups
    fresh = optimizer.state_dict()["param_groups"]
    if [(g.get("name"), g.get("params")) for g in saved["param_groups"] if isinstance(g, dict)] != [
            (g["name"], g["params"]) for g in fresh]:
        raise ValueError("its optimizer's parameter groups are not this run's")
    params = [p for g in groups for p in g["params"]]
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        index, key = name[len("optimizer."):].split(".", 1)
        if not index.isdigit() or int(index) >= len(params):
            raise ValueError(f"its optimizer state {name} belongs to no parameter")
        param = params[int(index)]
        expected = () if key == "step" else tuple(param.shape)
        if key not in ("step", "exp_avg", "exp_avg_sq") or tuple(value.shape) != expected:
            raise ValueError(f"its optimizer state {name} of shape {tuple(value.shape)} does not fit the "
                             f"parameter's {tuple(param.shape)}")
        if key == "step" and not 0 <= float(value) <= step:
            raise ValueError(f"its optimizer step count {float(value)} does not fit step {step}")
    for name, value in saved["scalars"].items():
        if not _is_number(value):
            raise ValueError(f"its optimizer value {name} is not a finite number")
