"""The measuring world beside the core: a toy world with exact masks and a judge (`toy`), a small trained
text-to-image model of it and its trainer, random test models (`tiny_models`), the demo on the embedded
default (`demo`) and the benchmarks (`bench`). It imports the core; the core never imports it.

`python -m attencraft_lab --help` lists its commands.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the measuring world reaches a model hub
