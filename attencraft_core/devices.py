"""Choice of device and dtype, without hard-coding any accelerator name."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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


def machine_description(device: torch.device | None = None) -> str:
    """One line naming what a benchmark's speed and floating-point results depend on: the processor (its name,
    family and model numbers, the vector instructions torch uses), CPUs and torch threads, torch's version, and
    `device` when it is not the CPU. Figures from machines that differ here need not agree to the last digit."""
    cpu = platform.processor() or platform.machine()
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = (line.partition(":") for line in first_cpu.splitlines())
        info = {key.strip(): value.strip() for key, _, value in fields}
        cpu = f"{info['model name']} (family {info['cpu family']} model {info['model']})"
    except (OSError, KeyError):
        pass
    text = (f"{cpu}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
            f"torch threads, torch {torch.__version__}")
    if device is not None and device.type != "cpu":
        backend = getattr(torch, device.type, None)
        name = backend.get_device_name(device) if hasattr(backend, "get_device_name") else str(device)
        text = f"{name}; {text}"
    return text
