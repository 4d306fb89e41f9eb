"""ComfyUI entry point of the AttenCraft node pack (ComfyUI loads this file by path).

V3 schema only: ComfyUI calls comfy_entrypoint(); no NODE_CLASS_MAPPINGS (a pack exporting both is loaded as V1).
Outside ComfyUI (pytest imports this package's __init__ too) there is nothing to register.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes.attencraft_nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
