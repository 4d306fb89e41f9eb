"""Node errors as ComfyUI users read them. The core's messages say how to fix a problem on the command line
(`--seed`, `--resume`); inside ComfyUI they name the node's inputs instead. ComfyUI shows an error's type as
`module.QualifiedName`, so the type the nodes raise carries the pack's name, not a file path."""

from __future__ import annotations

import functools
import re

from ..attencraft_core.api import AttenCraftError


class AttenCraftNodeError(Exception):
    """A problem the user can fix in the node's inputs (the message names them)."""


AttenCraftNodeError.__module__ = "AttenCraft"  # shown as "AttenCraft.AttenCraftNodeError"

# the core's command-line wording -> the nodes' inputs, longest phrases first
FOR_NODES = {
    "train without --resume": "train with resume off",
    "without --resume": "with resume off",
    "another --out folder": "another name",
    "--overwrite on the command line": "overwrite on",
    "--timestep range": "t_min/t_max range",
    "--seed": "seed",
    "--threshold": "threshold",
    "--lr": "learning_rate",
    "--resume": "resume",
    "--out": "name",
}
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def for_nodes(message: str) -> str:
    """`message` with command-line flags replaced by the node inputs that set the same thing."""
    for phrase, words in FOR_NODES.items():
        message = message.replace(phrase, words)
    return FLAG.sub(lambda m: m.group(0)[2:].replace("-", "_"), message)


def node_errors(execute):
    """Wrap a node's execute: the core's AttenCraftError becomes an AttenCraftNodeError worded for nodes, without
    the traceback from inside the core. It is raised outside the handler, so it holds no reference to the core's
    frames: their model copy (gigabytes for Flux) is freed at once, not when ComfyUI drops the error."""
    @functools.wraps(execute)
    def wrapper(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        except AttenCraftError as exc:
            message = for_nodes(str(exc))
        raise AttenCraftNodeError(message)
    return wrapper
