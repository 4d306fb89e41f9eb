"""Settings defined once. Each setting is a dataclass field made by `setting()`, carrying its help text and its
range or choices; the command line (`add_arguments`, `from_arguments`) and the ComfyUI nodes' inputs are built
from these fields, and `check_settings` validates them, so a setting's default, help and range live in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .errors import AttenCraftError
from .validation import MAX_SEED, require_number


def setting(default: Any = None, help: str = "", *, low: float | None = None, high: float | None = None,
            low_open: bool = False, choices: tuple | None = None, multiple_of: int | None = None,
            flag: str | None = None, cli: bool = True, default_factory=None):
    """A dataclass field with what the command line, the nodes and the checks need to know about it.

    low/high (low excluded with low_open): the range of a number; choices: the allowed values; multiple_of: e.g.
    8 for image sides; flag: the command-line flag when it is not --<name-with-dashes>; cli=False: not offered on
    the command line (set by code).
    """
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "choices": choices,
            "multiple_of": multiple_of, "flag": flag, "cli": cli}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def seed_setting(help: str, flag: str | None = None):
    return setting(0, help, low=0, high=MAX_SEED, flag=flag)


def settings_of(cls) -> list[dataclasses.Field]:
    """The fields of a settings class that were made by setting()."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def value_type(f: dataclasses.Field) -> type:
    """int, float, bool or str, from the field's annotation (a string under postponed annotations)."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.split("|")[0].strip() == name:
            return kind
    raise TypeError(f"setting {f.name} has an unsupported type {annotation}")


def check_settings(obj, what: str) -> None:
    """Every setting of `obj` in its range or among its choices; None (taken from elsewhere) is skipped."""
    for f in settings_of(type(obj)):
        value, meta = getattr(obj, f.name), f.metadata
        name = f"{what} setting {f.name}"
        if value is None or value_type(f) is bool:
            continue
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                raise AttenCraftError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}.")
            continue
        if value_type(f) is str:
            continue
        require_number(name, value, meta["low"], meta["high"], meta["low_open"], integer=value_type(f) is int,
                       multiple_of=meta["multiple_of"])


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple = (),
                  flags: dict | None = None) -> None:
    """One command-line option per setting of `cls` (dest `prefix + name`), with its help and default.

    A bool setting that defaults to True becomes --no-<name>. `flags` renames options for this command.
    """
    defaults = cls()
    for f in settings_of(cls):
        if f.name in skip or not f.metadata["cli"]:
            continue
        kind, default, meta = value_type(f), getattr(defaults, f.name), f.metadata
        flag = (flags or {}).get(f.name) or flag_of(f)
        if kind is bool:
            if default:
                parser.add_argument("--no-" + flag[2:], dest=prefix + f.name, action="store_false", help=meta["help"])
            else:
                parser.add_argument(flag, dest=prefix + f.name, action="store_true", help=meta["help"])
            continue
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(flag, dest=prefix + f.name, type=kind, default=default, choices=meta["choices"],
                            metavar=None if meta["choices"] else f.name.upper(), help=meta["help"] + shown)


def from_arguments(cls, args: argparse.Namespace, prefix: str = "", **values):
    """An instance of `cls` from parsed arguments (those add_arguments made) plus explicit `values`."""
    for f in settings_of(cls):
        if f.name not in values and hasattr(args, prefix + f.name):
            values[f.name] = getattr(args, prefix + f.name)
    return cls(**values)
