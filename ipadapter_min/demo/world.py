"""The demo's data: one coloured shape on a plain background, 64×64, with exact attributes.

Every image is a function of its scene and a seed (a small jitter of place and turn), drawn at 4×
and downscaled, so that edges are smooth. Captions name all the attributes ("a large red star on
the left on a blue background"), some of them ("a red star", "a star on a blue background") or
none (""), so that the text encoder learns each word and classifier-free guidance has an
unconditional branch to learn.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 40), "green": (40, 170, 60),
    "cyan": (40, 210, 220), "blue": (30, 70, 220), "purple": (130, 50, 190), "pink": (245, 130, 190),
    "brown": (120, 70, 30), "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")
SIZES = {"small": 0.12, "medium": 0.18, "large": 0.26}  # radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                  "center": "in the center"}
ATTRIBUTES = {"color": tuple(COLORS), "background": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES),
              "position": tuple(POSITIONS)}
# Every word a caption can contain.
WORDS = sorted({"a", "on", "background", *COLORS, *SHAPES, *SIZES, *(w for p in POSITION_WORDS.values() for w in p.split())})
SIZE = 64
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str
    background: str

    def attribute(self, name: str) -> str:
        return getattr(self, name)


def scene_index(scene: Scene) -> list[int]:
    """The scene as attribute indices (in ATTRIBUTES order): storable in a tensor."""
    return [values.index(scene.attribute(name)) for name, values in ATTRIBUTES.items()]


def scene_from_index(index: list[int]) -> Scene:
    return Scene(**{name: values[i] for (name, values), i in zip(ATTRIBUTES.items(), index)})


def random_scene(rng: random.Random) -> Scene:
    """Uniform attributes; the background is any colour but the shape's."""
    color = rng.choice(ATTRIBUTES["color"])
    background = rng.choice([c for c in COLORS if c != color])
    return Scene(color, rng.choice(SHAPES), rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS)), background)


def scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def full_caption(scene: Scene) -> str:
    return f"a {scene.size} {scene.color} {scene.shape} {POSITION_WORDS[scene.position]} on a {scene.background} background"


def training_caption(scene: Scene, rng: random.Random) -> str:
    """Half full captions, 10% empty, the rest naming a random subset of the attributes (the shape
    always, so that a caption stays a phrase)."""
    r = rng.random()
    if r < 0.1:
        return ""
    if r < 0.6:
        return full_caption(scene)
    words = ["a"]
    if rng.random() < 0.5:
        words.append(scene.size)
    if rng.random() < 0.7:
        words.append(scene.color)
    words.append(scene.shape)
    if rng.random() < 0.4:
        words.append(POSITION_WORDS[scene.position])
    if rng.random() < 0.4:
        words += ["on a", scene.background, "background"]
    return " ".join(words)


def _polygon(cx: float, cy: float, radius: float, corners: int, turn: float, inner: float | None = None) -> list:
    """Regular polygon (or star, alternating with ``inner`` × radius) around (cx, cy)."""
    points = []
    steps = corners * (2 if inner else 1)
    for i in range(steps):
        r = radius * (inner if inner and i % 2 else 1)
        a = turn + 2 * math.pi * i / steps - math.pi / 2
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def render(scene: Scene, seed: int = 0) -> Image.Image:
    """The scene as a 64×64 RGB image; ``seed`` jitters the place (±2 px) and turn (±10°)."""
    rng = random.Random(seed)
    side = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (side, side), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-2, 2) / SIZE) * side
    cy = (fy + rng.uniform(-2, 2) / SIZE) * side
    r = SIZES[scene.size] * side
    turn = math.radians(rng.uniform(-10, 10))
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=COLORS[scene.background])
    elif scene.shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, turn + math.pi / 4), fill=fill)
    elif scene.shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, turn), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, r * 1.2, 3, turn), fill=fill)
    elif scene.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.05, 6, turn), fill=fill)
    elif scene.shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.25, 5, turn, inner=0.45), fill=fill)
    elif scene.shape == "cross":
        arm = 0.36 * r
        for dx, dy in ((r, arm), (arm, r)):
            corners = [(-dx, -dy), (dx, -dy), (dx, dy), (-dx, dy)]
            draw.polygon([(cx + x * math.cos(turn) - y * math.sin(turn), cy + x * math.sin(turn) + y * math.cos(turn))
                          for x, y in corners], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image.resize((SIZE, SIZE), Image.LANCZOS)
