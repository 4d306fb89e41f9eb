"""A deterministic judge of toy-world images: which shapes, colours and patterns an image holds, and where.

Foreground = pixels far from the background colour (the commonest border colour); objects = its connected
components; shape = the best-fitting rendered template (IoU over a small search of size and position);
colour = the palette colour most pixels are nearest to; pattern = the share of stripe-shade / dot-shade pixels.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLOURS, SHAPES, pattern_colour, shape_mask

MIN_PIXELS = 15


@dataclass
class Detection:
    shape: str
    colour: str
    pattern: str
    mask: np.ndarray
    shape_iou: float

    @property
    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())


def _components(fg: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, largest first."""
    labels = np.zeros(fg.shape, np.int32)
    found = []
    h, w = fg.shape
    for y0, x0 in zip(*np.nonzero(fg)):
        if labels[y0, x0]:
            continue
        label = len(found) + 1
        queue, pixels = deque([(y0, x0)]), []
        labels[y0, x0] = label
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        found.append(labels == label)
    return sorted(found, key=lambda m: -int(m.sum()))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    outside = _components(~mask)
    border = [m for m in outside if m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()]
    return ~np.any(border, axis=0) if border else np.ones_like(mask)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best template (and its IoU) for one object's mask."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = float(max(y1 - y0, x1 - x0))
    best = ("circle", -1.0)
    for shape in SHAPES:
        for scale in (0.97, 1.0, 1.05, 1.1):
            size = side * scale
            for dy in (-1.5, -0.75, 0.0, 0.75, 1.5):  # stars and hearts sit off their box's centre
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + dy
                template = shape_mask(shape, cx, cy, size, mask.shape[0])
                union = (template | mask).sum()
                iou = float((template & mask).sum() / union) if union else 0.0
                if iou > best[1]:
                    best = (shape, iou)
    return best


def _palette():
    names, rows = [], []
    for name, rgb in COLOURS.items():
        for kind, colour in (("solid", rgb), ("striped", pattern_colour(rgb, "striped")),
                             ("dotted", pattern_colour(rgb, "dotted"))):
            names.append((name, kind))
            rows.append(colour)
    return names, np.array(rows, np.float32)


PALETTE_NAMES, PALETTE = _palette()


def analyse(image: Image.Image | np.ndarray) -> list[Detection]:
    """Every object in a toy-world image, largest first."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).round().astype(int)
    background = np.array(Counter(map(tuple, border)).most_common(1)[0][0], np.float32)
    fg = np.linalg.norm(pixels - background, axis=-1) > 45
    detections = []
    for component in _components(fg):
        if component.sum() < MIN_PIXELS:
            continue
        shape, iou = classify_shape(component)
        nearest = np.linalg.norm(pixels[component][:, None] - PALETTE[None], axis=-1).argmin(1)
        kinds = Counter(PALETTE_NAMES[i][1] for i in nearest)
        colours = Counter(PALETTE_NAMES[i][0] for i in nearest if PALETTE_NAMES[i][1] == "solid")
        colour = (colours or Counter(PALETTE_NAMES[i][0] for i in nearest)).most_common(1)[0][0]
        total = len(nearest)
        pattern = ("striped" if kinds["striped"] > 0.15 * total else
                   "dotted" if kinds["dotted"] > 0.08 * total else "solid")
        detections.append(Detection(shape, colour, pattern, component, iou))
    return detections
