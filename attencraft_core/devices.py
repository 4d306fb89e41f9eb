"""Choice of device and dtype, without hard-coding any accelerator name."""

from __future__ import annotations

import os

import torch

from .errors import AttenCraftError


def default_device() -> torch.device:
    """The current accelerator torch reports (CUDA, ROCm, XPU, MPS...), else the CPU."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        return torch.device(accel.current_accelerator())
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or "auto" picks the default device; anything else must name a device this machine has."""
    if device is None or device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise AttenCraftError(f"{str(device)!r} is not a device name ({exc}). Use auto, cpu, or e.g. "
                              f"{default_device().type}:0.") from exc
    if resolved.type != "cpu":
        module = getattr(torch, resolved.type, None)
        available = module is not None and hasattr(module, "is_available") and module.is_available()
        count = module.device_count() if available and hasattr(module, "device_count") else 0
        if not available or (resolved.index is not None and resolved.index >= count):
            raise AttenCraftError(f"Device {str(device)!r} is not available on this machine (the default here "
                                  f"is {default_device()}). Use auto or cpu.")
    return resolved


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now (CUDA-style accelerators and the CPU on Linux); None where torch cannot tell."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "mem_get_info"):
        return int(module.mem_get_info(device)[0])
    return None


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def supports_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 (an accelerator that says so; the CPU is never used in half)."""
    module = getattr(torch, device.type, None)
    check = getattr(module, "is_bf16_supported", None)
    return device.type != "cpu" and (check() if check is not None else True)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights for a precision name: "auto" (the default) is bf16 on an accelerator that
    has it, fp16 on another accelerator (training then scales the loss), fp32 on the CPU; "fp32", "bf16", "fp16"
    as named. Half precision is never used on the CPU (fp32 there)."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        table = {"fp32": torch.float32, "float32": torch.float32,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}
        if name in (None, "auto"):
            return torch.float32 if device.type == "cpu" else torch.bfloat16 if supports_bf16(device) else torch.float16
        if name not in table:
            raise AttenCraftError(f"Unknown precision {name!r}: use auto, fp32, bf16 or fp16.")
        dtype = table[name]
    if device.type == "cpu" and dtype != torch.float32:
        return torch.float32
    return dtype
