"""Helpers the tests share (plain functions; the fixtures are in conftest.py)."""

import numpy as np
import torch
from PIL import Image


def two_object_array(size: int = 64) -> np.ndarray:
    """A grey scene with a red square top-left and a blue square bottom-right."""
    a = np.full((size, size, 3), 200, np.uint8)
    s = size // 64
    a[8 * s:28 * s, 6 * s:26 * s] = (220, 30, 30)
    a[36 * s:58 * s, 36 * s:60 * s] = (30, 30, 220)
    return a


def quadrant_blobs(side: int, n: int) -> torch.Tensor:
    """[n, side, side] disjoint square blobs in the four quadrants (order: TL, BR, TR, BL)."""
    q = side // 2
    corners = [(0, 0), (q, q), (0, q), (q, 0)]
    blobs = torch.zeros(n, side, side)
    for k, (y, x) in enumerate(corners[:n]):
        blobs[k, y + q // 4: y + q - q // 4, x + q // 4: x + q - q // 4] = 1
    return blobs


def scene_image() -> Image.Image:
    """The two-object scene as an image."""
    return Image.fromarray(two_object_array())


def class_image() -> Image.Image:
    """A prior-preservation stand-in: the scene upside down."""
    return Image.fromarray(two_object_array()[::-1].copy())
