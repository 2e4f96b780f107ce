"""Reading a 64 px image of the world back into its scene: the inverse of the renderer.

The background is the most common palette colour along the image's border; the object is every pixel far from
the background's colour; its colour is the majority palette colour of its clearly coloured pixels, and a second
colour that holds a clear share of them makes it two-coloured; its place is the nearest anchor to its centroid;
its shape and size are the best match (intersection over union) among the renderer's own masks of every shape,
size and rotation, centred on the same centroid. The subject is recognised by its pattern: two-coloured, magenta
and cyan. The same rules read generated images, where edges blur and colours drift: pixels too far from every
palette colour are simply not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from .world import COLOURS, POSITIONS, SHAPES, SIZE, SIZES, SUBJECT_COLOURS, SYMMETRY, shape_mask

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)  # [K, 3]
OBJECT_DISTANCE = 90.0  # a pixel this far (RGB) from the background colour belongs to the object
CLEAR_DISTANCE = 70.0  # a pixel counts for a colour only this close to it
MIN_OBJECT_PIXELS = 12
MAX_OBJECT_SHARE = 0.5  # an "object" covering more of the image than this is not one of the world's shapes
MIN_MATCH = 0.4  # nor is one that overlaps the best of the renderer's masks by less than this (IoU)
SECOND_COLOUR_SHARE = 0.2  # a second colour this share of the object's clear pixels makes it two-coloured
ROTATION_STEPS = 12


@dataclass(frozen=True)
class Reading:
    """What an image shows. ``found`` is False when no shape of the world stands out from the background: nothing
    differs from it, or what differs covers half the image or matches none of the renderer's shapes (noise); then
    the object's fields are empty."""

    background: str
    found: bool
    colour: str = ""  # the majority colour
    colour2: str = ""  # the second colour of a two-coloured object ("": one colour)
    shape: str = ""
    size: str = ""
    position: str = ""
    match: float = 0.0  # intersection over union with the best of the renderer's masks

    @property
    def subject(self) -> bool:
        """The subject's pattern: two halves, magenta and cyan (in either order)."""
        return self.found and {self.colour, self.colour2} == set(SUBJECT_COLOURS)


def nearest_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into COLOURS of the nearest colour of each pixel [..., 3], and the distance to it."""
    d = np.linalg.norm(pixels[..., None, :].astype(np.float32) - _PALETTE, axis=-1)
    return d.argmin(-1), d.min(-1)


@cache
def _templates() -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Centred masks of every shape, size and rotation [N, 64, 64] bool, and each one's (shape, size)."""
    masks, labels = [], []
    centre = SIZE / 2
    for shape in SHAPES:
        steps = 1 if shape == "circle" else ROTATION_STEPS
        for size, radius in SIZES.items():
            for i in range(steps):
                mask = np.asarray(shape_mask(shape, centre, centre, radius, i * SYMMETRY[shape] / steps)) > 0
                masks.append(mask)
                labels.append((shape, size))
    return np.stack(masks), labels


def _centred(mask: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """``mask`` shifted so that (cx, cy) lands on the image centre (pixels pushed out are dropped)."""
    sx, sy = int(round(SIZE / 2 - cx)), int(round(SIZE / 2 - cy))
    out = np.zeros_like(mask)
    src = mask[max(0, -sy):SIZE - max(0, sy), max(0, -sx):SIZE - max(0, sx)]
    out[max(0, sy):max(0, sy) + src.shape[0], max(0, sx):max(0, sx) + src.shape[1]] = src
    return out


def analyse(image: np.ndarray) -> Reading:
    """Read one uint8 [64, 64, 3] RGB image."""
    image = np.asarray(image)
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected a {SIZE}x{SIZE} RGB image, got shape {image.shape}")
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    border_idx, _ = nearest_colours(border)
    bg_index = int(np.bincount(border_idx, minlength=len(_NAMES)).argmax())
    background = _NAMES[bg_index]
    bg_colour = np.median(border[border_idx == bg_index], axis=0)  # the image's own shade of it
    mask = np.linalg.norm(pixels - bg_colour, axis=-1) > OBJECT_DISTANCE
    if not MIN_OBJECT_PIXELS <= mask.sum() <= MAX_OBJECT_SHARE * mask.size:
        return Reading(background=background, found=False)

    idx, dist = nearest_colours(pixels[mask])
    clear = idx[(dist < CLEAR_DISTANCE) & (idx != bg_index)]
    counts = np.bincount(clear, minlength=len(_NAMES)) if clear.size else np.zeros(len(_NAMES), int)
    order = np.argsort(-counts, kind="stable")
    colour = _NAMES[order[0]] if counts[order[0]] else ""
    second = counts[order[1]] >= SECOND_COLOUR_SHARE * max(int(counts.sum()), 1) and counts[order[1]] > 0
    colour2 = _NAMES[order[1]] if second else ""

    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    templates, labels = _templates()
    centred = _centred(mask, cx, cy)
    inter = (templates & centred).sum(axis=(1, 2))
    union = (templates | centred).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1)
    best = int(iou.argmax())
    if iou[best] < MIN_MATCH:
        return Reading(background=background, found=False, match=float(iou[best]))
    shape, size = labels[best]
    return Reading(background=background, found=True, colour=colour, colour2=colour2, shape=shape, size=size,
                   position=position, match=float(iou[best]))
