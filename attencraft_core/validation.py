"""Checks on numbers: settings finite and in their range (one clear error naming the setting), tensors finite."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .errors import AttenCraftError

MAX_SEED = 2 ** 63 - 1
MAX_WEIGHT = 1e4  # the largest magnitude read in learned embeddings and LoRA weights (trained ones stay far below)


def require_number(name: str, value, low: float | None = None, high: float | None = None,
                   low_open: bool = False, integer: bool = False, multiple_of: int | None = None) -> None:
    """Raise AttenCraftError unless `value` is a finite number in [low, high] ((low, high] with low_open), and a
    multiple of `multiple_of` when given."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise AttenCraftError(f"{name} must be {kind}, got {value!r}.")
    if not math.isfinite(value):
        raise AttenCraftError(f"{name} must be a finite number, got {value}.")
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {shown(low)}")
    if high is not None:
        bounds.append(f"<= {shown(high)}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        raise AttenCraftError(f"{name} must be {' and '.join(bounds)}, got {shown(value)}.")
    if multiple_of and value % multiple_of:
        raise AttenCraftError(f"{name} must be a multiple of {multiple_of}, got {shown(value)}.")


def shown(x: float) -> str:
    """A bound or value as a person writes it: 1000000 -> "1000000", 0.0001 -> "0.0001"."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e18 else f"{x:g}"


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _checkable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in a dtype torch computes with (float8 and other storage dtypes are widened)."""
    return tensor if tensor.dtype in COMPUTE_DTYPES else tensor.float()


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor that holds NaN or an infinity, None when all are finite."""
    for name, tensor in named:
        if tensor.is_floating_point() and not torch.isfinite(_checkable(tensor)).all():
            return name
    return None


def first_too_large(named: Iterable[tuple[str, torch.Tensor]], limit: float) -> tuple[str, float] | None:
    """(name, largest magnitude) of the first floating tensor with a value beyond +-limit, None if there is none."""
    for name, tensor in named:
        if tensor.is_floating_point() and tensor.numel():
            largest = float(_checkable(tensor).abs().max())
            if largest > limit:
                return name, largest
    return None


def require_seed(name: str, value) -> None:
    require_number(name, value, 0, MAX_SEED, integer=True)
