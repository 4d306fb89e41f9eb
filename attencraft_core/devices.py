"""Choice of device and dtype, without hard-coding any accelerator name."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The current accelerator torch reports (CUDA, ROCm, XPU, MPS...), else the CPU."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        return torch.device(accel.current_accelerator())
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto" picks the default device; anything else is passed to torch.device."""
    if device is None or device == "auto":
        return default_device()
    return torch.device(device)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Map "fp32"/"bf16"/"fp16" to a dtype; half precision is refused on the CPU (fp32 there)."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        table = {None: torch.float32, "fp32": torch.float32, "float32": torch.float32,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}
        if name not in table:
            from .errors import AttenCraftError
            raise AttenCraftError(f"Unknown precision {name!r}: use fp32, bf16 or fp16.")
        dtype = table[name]
    if device.type == "cpu" and dtype != torch.float32:
        return torch.float32
    return dtype
