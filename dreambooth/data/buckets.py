"""Aspect-ratio buckets: train each image near its own shape instead of cropping everything square.

A bucket is a (width, height) with both sides multiples of the latent grid step and about the pixel count of the
square training resolution, so every batch costs about the same memory. Images are scaled to cover their bucket
with the aspect ratio kept and only the small excess is cropped; nothing is ever stretched.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from fractions import Fraction

from PIL import Image


def make_buckets(max_resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Buckets (width, height) of at most ``max_resolution**2`` pixels, aspect within 1/max_ratio..max_ratio.

    For every width that is a multiple of ``step`` the tallest height within the area and the ratio is taken, so
    each bucket uses as much of the pixel budget as its shape allows; every bucket's transpose is included too, so
    portrait and landscape images are treated alike, and of buckets with the same aspect ratio only the largest is
    kept. The square ``(max_resolution, max_resolution)`` is always included. Sorted from tallest to widest.
    """
    if max_resolution <= 0 or step <= 0:
        raise ValueError(f"max_resolution and step must be positive, got {max_resolution} and {step}")
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    area = max_resolution * max_resolution
    buckets = {(max_resolution, max_resolution)}
    widest = math.isqrt(int(area * max_ratio))  # w/h <= max_ratio and w*h <= area give w*w <= area*max_ratio
    width = step
    while width <= widest:
        height = min(area // width, math.floor(width * max_ratio)) // step * step
        if height >= step and 1.0 / max_ratio <= width / height <= max_ratio:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    largest: dict[Fraction, tuple[int, int]] = {}  # one bucket per aspect ratio: the largest
    for w, h in buckets:
        ratio = Fraction(w, h)
        if ratio not in largest or w * h > largest[ratio][0] * largest[ratio][1]:
            largest[ratio] = (w, h)
    return sorted(largest.values(), key=lambda b: b[0] / b[1])


def choose_bucket(width: int, height: int, buckets: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (log-ratio distance); ties go to the larger one."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    best: tuple[int, int] | None = None
    best_key: tuple[float, int] | None = None
    for bw, bh in buckets:
        key = (round(abs(math.log(bw / bh) - target), 12), -bw * bh)
        if best_key is None or key < best_key:
            best, best_key = (bw, bh), key
    if best is None:
        raise ValueError("no buckets to choose from")
    return best


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int], rng: random.Random | None = None) -> Image.Image:
    """Scale ``img`` uniformly until it covers ``bucket``, then crop the excess (centred, or at random with rng).

    The same scale factor is used on both axes, so shapes are never distorted.
    """
    bw, bh = bucket
    width, height = img.size
    scale = max(bw / width, bh / height)
    new_w = max(bw, round(width * scale))
    new_h = max(bh, round(height * scale))
    if (new_w, new_h) != (width, height):
        if scale < 1.0:
            img = img.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        else:
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    excess_x, excess_y = new_w - bw, new_h - bh
    if rng is None:
        left, top = excess_x // 2, excess_y // 2
    else:
        left, top = rng.randint(0, excess_x), rng.randint(0, excess_y)
    if (excess_x, excess_y) == (0, 0):
        return img
    return img.crop((left, top, left + bw, top + bh))
