"""AttenCraft: learn several concepts from one image with attention-guided masks (diffusers + torch).

This package never imports ComfyUI; `python -m attencraft_core --help` runs it on its own.
"""

__version__ = "0.1.0"

from .concepts import Concept, parse_concepts  # noqa: E402
from .errors import AttenCraftError  # noqa: E402

__all__ = ["AttenCraftError", "Concept", "parse_concepts", "__version__"]
