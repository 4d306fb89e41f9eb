"""Device and precision choice, and the machine line the benchmarks print."""

import pytest
import torch

from attencraft_core import AttenCraftError
from attencraft_core.devices import resolve_device, resolve_dtype
from attencraft_lab.machine import machine_description


def test_half_precision_is_never_used_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp16", cpu) == torch.float32
    assert resolve_dtype(torch.bfloat16, cpu) == torch.float32
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("auto", cpu) == torch.float32


def test_unknown_precision_names_the_accepted_ones():
    with pytest.raises(AttenCraftError, match="auto, fp32, bf16 or fp16"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_machine_line_names_what_results_depend_on():
    line = machine_description(resolve_device("cpu"))
    assert f"torch {torch.__version__}" in line
    assert f"{torch.get_num_threads()} torch threads" in line
    assert torch.backends.cpu.get_cpu_capability() in line
