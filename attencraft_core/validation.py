"""Range checks for numeric settings: every number finite and in its range, one clear error naming the setting."""

from __future__ import annotations

import math

from .errors import AttenCraftError

MAX_SEED = 2 ** 63 - 1


def require_number(name: str, value, low: float | None = None, high: float | None = None,
                   low_open: bool = False, integer: bool = False) -> None:
    """Raise AttenCraftError unless `value` is a finite number in [low, high] ((low, high] with low_open)."""
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


def shown(x: float) -> str:
    """A bound or value as a person writes it: 1000000 -> "1000000", 0.0001 -> "0.0001"."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e18 else f"{x:g}"


def require_seed(name: str, value) -> None:
    require_number(name, value, 0, MAX_SEED, integer=True)
