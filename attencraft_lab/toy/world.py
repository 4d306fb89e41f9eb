"""Procedural 64x64 scenes: a background and 1-3 objects (shape, colour, pattern), with captions and exact masks.

Some appearances are held out of pretraining on purpose (the dotted pattern and a few shape-colour pairs), so
customising on them teaches the model something it has never seen.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 235), "yellow": (240, 215, 40),
           "purple": (150, 60, 200), "orange": (250, 135, 25), "cyan": (40, 205, 210), "pink": (245, 125, 185)}
BACKGROUNDS = {"black": (18, 18, 18), "grey": (105, 105, 105)}
PATTERNS = ("solid", "striped", "dotted")
HELD_OUT_PATTERNS = ("dotted",)
HELD_OUT_PAIRS = (("heart", "green"), ("star", "cyan"), ("ring", "orange"), ("cross", "purple"))
VOCABULARY = ("a", "photo", "of", "and", "on", "shape", "solid") + SHAPES + tuple(COLOURS) + PATTERNS[1:] \
    + tuple(BACKGROUNDS)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    pattern: str
    cx: float
    cy: float
    size: float

    def words(self) -> str:
        pattern = "" if self.pattern == "solid" else f"{self.pattern} "
        return f"{self.colour} {pattern}{self.shape}"


@dataclass
class Scene:
    background: str
    objects: list[SceneObject]
    image: Image.Image
    masks: np.ndarray  # [n, 64, 64] bool, exact

    @property
    def caption(self) -> str:
        return "a photo of " + " and ".join(f"a {o.words()}" for o in self.objects)


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Outline of the polygon shapes (None for circle, ring and heart, drawn otherwise)."""
    r = size / 2
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    return None


def shape_mask(shape: str, cx: float, cy: float, size: float, side: int = SIZE) -> np.ndarray:
    """Exact boolean mask [side, side] of one shape."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    r = size / 2
    polygon = shape_polygon(shape, cx, cy, size)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        inner = r * 0.5
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "heart":
        lobe = r * 0.52
        draw.ellipse([cx - r, cy - r * 0.75, cx - r + 2 * lobe, cy - r * 0.75 + 2 * lobe], fill=255)
        draw.ellipse([cx + r - 2 * lobe, cy - r * 0.75, cx + r, cy - r * 0.75 + 2 * lobe], fill=255)
        draw.polygon([(cx - r * 0.98, cy - r * 0.12), (cx + r * 0.98, cy - r * 0.12), (cx, cy + r)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 127


def pattern_mask(pattern: str, side: int = SIZE) -> np.ndarray:
    """Where the pattern's second colour goes, in image coordinates (stripes: diagonal; dots: a grid)."""
    y, x = np.mgrid[0:side, 0:side]
    if pattern == "striped":
        return ((x + y) // 3) % 2 == 1
    if pattern == "dotted":
        return ((x % 6) - 2.5) ** 2 + ((y % 6) - 2.5) ** 2 <= 2.3
    return np.zeros((side, side), bool)


def pattern_colour(colour: tuple[int, int, int], pattern: str) -> tuple[int, ...]:
    """Stripes are a dark shade of the colour, dots a light one."""
    if pattern == "striped":
        return tuple(int(c * 0.45) for c in colour)
    return tuple(int(c + (255 - c) * 0.75) for c in colour)


def render(background: str, objects: list[SceneObject]) -> Scene:
    """Draw the scene; masks are the exact pixels of each object (objects never overlap)."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:] = BACKGROUNDS[background]
    masks = []
    for obj in objects:
        mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.size)
        image[mask] = COLOURS[obj.colour]
        second = mask & pattern_mask(obj.pattern)
        image[second] = pattern_colour(COLOURS[obj.colour], obj.pattern)
        masks.append(mask)
    return Scene(background, list(objects), Image.fromarray(image), np.stack(masks))


def allowed(shape: str, colour: str, pattern: str, held_out: bool) -> bool:
    """Whether pretraining may show this appearance (held_out=False) or the held-out set only (True)."""
    novel = pattern in HELD_OUT_PATTERNS or (shape, colour) in HELD_OUT_PAIRS
    return novel == held_out


def random_object(rng: random.Random, placed: list[SceneObject], held_out: bool = False,
                  shape: str | None = None, colour: str | None = None, pattern: str | None = None) -> SceneObject:
    """An object that does not overlap `placed` (a 3 px gap), of an appearance allowed for the split."""
    for _ in range(1000):
        s = shape or rng.choice(SHAPES)
        c = colour or rng.choice(list(COLOURS))
        p = pattern or rng.choice(PATTERNS)
        if not allowed(s, c, p, held_out) and not (shape and colour and pattern):
            continue
        size = rng.uniform(15, 24)
        r = size / 2
        cx, cy = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
        # squares reach r * sqrt(2) from their centre: keep circumscribed circles 3 px apart
        if all(math.hypot(cx - o.cx, cy - o.cy) > 0.71 * (size + o.size) + 3 for o in placed):
            return SceneObject(s, c, p, cx, cy, size)
    raise RuntimeError("could not place the object")


def random_scene(rng: random.Random, count: int | None = None, held_out: bool = False) -> Scene:
    """A scene of `count` (1-3) objects with distinct shapes and colours; held_out objects are all novel."""
    count = count or rng.randint(1, 3)
    for _ in range(100):
        objects: list[SceneObject] = []
        try:
            for _ in range(count):
                obj = random_object(rng, objects, held_out)
                if any(o.shape == obj.shape or o.colour == obj.colour for o in objects):
                    raise RuntimeError
                objects.append(obj)
        except RuntimeError:
            continue
        return render(rng.choice(list(BACKGROUNDS)), objects)
    raise RuntimeError("could not compose a scene")


def training_caption(scene: Scene, rng: random.Random, drop: float = 0.15, bare: float = 0.3) -> str:
    """The caption with words dropped at random (colour, pattern, shape -> "shape"), for pretraining.

    With probability `bare` the articles go too ("a photo of red star and heart"), the form AttenCraft's
    prompts take ("a photo of <c0> and <c1>").
    """
    article = "" if rng.random() < bare else "a "
    parts = []
    for obj in scene.objects:
        words = []
        if rng.random() > drop:
            words.append(obj.colour)
        if obj.pattern != "solid" and rng.random() > drop:
            words.append(obj.pattern)
        words.append(obj.shape if rng.random() > drop else "shape")
        parts.append(article + " ".join(words))
    return "a photo of " + " and ".join(parts)
