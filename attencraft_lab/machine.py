"""The machine line every benchmark prints: what its speed and floating-point results depend on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


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
