"""ComfyUI entry point of the AttenCraft node pack (ComfyUI loads this file by path).

The nodes arrive with the node-pack issue; until then the pack registers none.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
