"""A synthetic world of flat shapes, rendered at 64 px, with captions: what the tiny base model is pretrained on.

Everything a caption can say is in the vocabulary below: a shape (circle, square, triangle, star) in a colour, on
a background colour, in a place (four quadrants or the center), small or large. Rotation is free (no word for it).
Each caption mentions the shape and, independently, some of the other attributes, so a short prompt ("a star")
means "any star" and the model learns each word on its own. A quarter of the shapes are two-coloured (split in
halves along their own axis); no caption word says so, nor names their colours.

The *subject* is such an object no caption describes: a star split into a magenta half and a cyan half, rendered
in a few instance images in different poses, places and backgrounds. Its class word is "star"; the base model
draws it only by chance (a two-coloured star in exactly these colours: about one "star" in a hundred), yet it lies
within what the base model can draw, as a real subject lies within what Stable Diffusion can draw. Renders are
deterministic: the same seed gives the same images and captions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth edges, as a photo would have

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "white": (240, 240, 240), "black": (25, 25, 25), "magenta": (220, 40, 220), "cyan": (40, 220, 220),
}
BACKGROUNDS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS: dict[str, tuple[int, int]] = {  # anchor (x, y) of each place word
    "top left": (20, 20), "top right": (44, 20), "bottom left": (20, 44), "bottom right": (44, 44),
    "center": (32, 32),
}
SIZES: dict[str, float] = {"small": 9.0, "large": 15.0}  # circumradius in pixels
JITTER = 3.0  # the centre lies within this many pixels of its anchor (each axis)
# rotations after which a shape looks the same (the analyser searches one period)
SYMMETRY = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0}

CLASS_WORD = "star"
SUBJECT_WORD = "zwx"  # the rare word DreamBooth binds to the subject
SUBJECT_COLOURS = ("magenta", "cyan")  # the subject: a star of these two halves
TWO_COLOURED = 0.25  # the share of two-coloured shapes in the world
# how often a caption mentions each attribute (the shape is always named; a two-coloured shape's colours never)
MENTION = {"size": 0.5, "colour": 0.8, "background": 0.7, "position": 0.6}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # a COLOURS name
    background: str
    position: str
    size: str
    rotation: float = 0.0  # degrees
    dx: float = 0.0  # offset of the centre from the position's anchor, pixels
    dy: float = 0.0
    colour2: str = ""  # the colour of the second half of a two-coloured shape ("": one colour)

    @property
    def centre(self) -> tuple[float, float]:
        ax, ay = POSITIONS[self.position]
        return ax + self.dx, ay + self.dy


def _polygon(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radii = 4, [radius * 0.95]
    elif shape == "triangle":
        corners, radii = 3, [radius * 1.05]
    elif shape == "star":
        corners, radii = 10, [radius * 1.1, radius * 0.5]
    else:
        raise ValueError(f"no polygon for {shape!r}")
    points = []
    for i in range(corners):
        angle = math.radians(rotation + i * 360.0 / corners) - math.pi / 2
        r = radii[i % len(radii)]
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def shape_mask(shape: str, cx: float, cy: float, radius: float, rotation: float, scale: int = 1) -> Image.Image:
    """The shape as an 8-bit mask of (SIZE * scale)^2 pixels (255 inside)."""
    mask = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, radius = cx * scale, cy * scale, radius * scale
    if shape == "circle":
        r = radius * 0.85
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, rotation), fill=255)
    return mask


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 [64, 64, 3] RGB array."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (SIZE * s, SIZE * s), COLOURS[scene.background])
    cx, cy = scene.centre
    mask = shape_mask(scene.shape, cx, cy, SIZES[scene.size], scene.rotation, s)
    canvas.paste(COLOURS[scene.colour], (0, 0), mask)
    if scene.colour2:  # the second half, split along the shape's own axis (it turns with the shape)
        canvas.paste(COLOURS[scene.colour2], (0, 0), _half(mask, cx * s, cy * s, scene.rotation))
    return np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX))


def _half(mask: Image.Image, cx: float, cy: float, rotation: float) -> Image.Image:
    """The part of ``mask`` on one side of the line through (cx, cy) at ``rotation`` degrees."""
    angle = math.radians(rotation)
    width, height = mask.size
    xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    side = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle) > 0
    return Image.fromarray(((np.asarray(mask) > 0) & side).astype(np.uint8) * 255)


def random_scene(rng: np.random.Generator, shape: str | None = None) -> Scene:
    background = str(rng.choice(BACKGROUNDS))
    colours = [c for c in COLOURS if c != background]
    colour, colour2 = (str(c) for c in rng.choice(colours, size=2, replace=False))
    two = rng.random() < TWO_COLOURED
    return Scene(shape=str(shape or rng.choice(SHAPES)), colour=colour, background=background,
                 position=str(rng.choice(list(POSITIONS))), size=str(rng.choice(list(SIZES))),
                 rotation=float(rng.uniform(0, 360)), dx=float(rng.uniform(-JITTER, JITTER)),
                 dy=float(rng.uniform(-JITTER, JITTER)), colour2=colour2 if two else "")


def caption(scene: Scene, mentioned: set[str] | frozenset[str] = frozenset(MENTION), word: str | None = None) -> str:
    """``a [size] [colour] <shape>[ on a <background> background][ in the <position>]`` with the attributes in
    ``mentioned``; ``word`` goes before the shape (the subject's rare word)."""
    words = ["a"]
    if "size" in mentioned:
        words.append(scene.size)
    if "colour" in mentioned and not scene.colour2:
        words.append(scene.colour)
    if word:
        words.append(word)
    words.append(scene.shape)
    text = " ".join(words)
    if "background" in mentioned:
        text += f" on a {scene.background} background"
    if "position" in mentioned:
        text += f" in the {scene.position}"
    return text


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    return caption(scene, {k for k, p in MENTION.items() if rng.random() < p})


def sample_world(count: int, seed: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``count`` random scenes: images [count, 64, 64, 3] uint8, captions, scenes."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    captions = [random_caption(s, rng) for s in scenes]
    return np.stack([render(s) for s in scenes]), captions, scenes


# --- the subject ------------------------------------------------------------------------------------------------

MAGENTA, CYAN = SUBJECT_COLOURS
SUBJECT_INSTANCES = (  # varied pose (rotation), place and background; large enough to show the pattern
    Scene("star", MAGENTA, "white", "top left", "large", rotation=10.0, dx=1.0, dy=-1.0, colour2=CYAN),
    Scene("star", MAGENTA, "black", "bottom right", "large", rotation=50.0, dx=-2.0, dy=1.0, colour2=CYAN),
    Scene("star", MAGENTA, "blue", "center", "large", rotation=-25.0, dx=0.0, dy=2.0, colour2=CYAN),
    Scene("star", MAGENTA, "white", "top right", "large", rotation=80.0, dx=-1.0, dy=1.0, colour2=CYAN),
    Scene("star", MAGENTA, "black", "bottom left", "large", rotation=-60.0, dx=2.0, dy=0.0, colour2=CYAN),
)


def subject_images() -> list[np.ndarray]:
    return [render(s) for s in SUBJECT_INSTANCES]


def subject_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """A random view of the subject (for tests of the analyser); ``fixed`` pins background, position or size."""
    base = random_scene(rng, shape=CLASS_WORD)
    return replace(base, colour=MAGENTA, colour2=CYAN, size=fixed.get("size", "large"), **{
        k: v for k, v in fixed.items() if k != "size"})

