"""Loss masks ("Masked loss"): which parts of an instance image train.

A mask is an image of the same size as its instance image: white trains fully, black not at all, grey partly. It
is found, first match wins, as ``name.mask.<ext>`` beside ``name.<ext>``, as ``masks/name.<ext>`` in the instance
folder, or as the instance image's own alpha channel (transparent parts do not train). An image with none trains
everywhere; class images always do. As in kohya's sd-scripts, the per-pixel loss is multiplied by the mask scaled to
the latent grid (area average) and then averaged over the whole image, so a subject that fills half of its image
contributes about half the loss of one that fills all of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from .buckets import fit_to_bucket
from .dataset import Example, TrainingData
from .images import IMAGE_EXTENSIONS, MASK_MARK, ImageError, has_alpha, load_upright, probe_image, to_rgb

log = logging.getLogger(__name__)

ALPHA = "alpha"  # the mask is the image's own alpha channel
MASKS_FOLDER = "masks"


def mask_file(image: Path) -> Path | None:
    """``name.mask.<ext>`` beside the image, else ``masks/name.<ext>`` in its folder, else None."""
    image = Path(image)
    candidates = [image.with_name(f"{image.stem}{MASK_MARK}{ext}") for ext in IMAGE_EXTENSIONS]
    candidates += [image.parent / MASKS_FOLDER / f"{image.stem}{ext}" for ext in IMAGE_EXTENSIONS]
    return next((c for c in candidates if c.is_file()), None)


def _carries_alpha(image: Path) -> bool:
    try:
        with Image.open(image) as img:  # the header only; the image itself was checked when the data was scanned
            return has_alpha(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def mask_source(image: Path) -> Path | str | None:
    """Where ``image``'s mask comes from: a mask file, :data:`ALPHA`, or None (no mask: it trains everywhere)."""
    found = mask_file(image)
    if found is not None:
        size, own = probe_image(found), probe_image(image)
        if size != own:
            raise ImageError(f"mask {found} is {size[0]}x{size[1]} but its image {image.name} is {own[0]}x{own[1]}",
                             "save the mask at the image's size (a mask marks the image's own pixels)")
        return found
    return ALPHA if _carries_alpha(image) else None


def load_mask(image: Path, source: Path | str, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """The mask as float32 ``[1, H, W]`` in [0, 1] at ``bucket``, cropped and mirrored exactly as its image is."""
    if source == ALPHA:
        mask = load_upright(image).convert("RGBA").getchannel("A")
    else:
        mask = to_rgb(load_upright(Path(source))).convert("L")
    mask = fit_to_bucket(mask, bucket)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(mask, dtype=np.float32) / 255.0)[None]


class LossMasks:
    """Every instance image's mask at the latent grid's size, made once per (image, bucket, flip)."""

    def __init__(self, data: TrainingData) -> None:
        self.sources: dict[Path, Path | str] = {}
        for ex in data.all_examples():
            if not ex.is_class:
                source = mask_source(ex.image)
                if source is not None:
                    self.sources[ex.image] = source
        instances = sum(len(items) for items in data.instances)
        if not self.sources:
            raise UserError("masked loss is on but no instance image has a mask",
                            f"put name{MASK_MARK}.png beside name.png (or masks/name.png into the instance folder, "
                            "or give the images an alpha channel), or turn masked loss off")
        if len(self.sources) < instances:
            log.warning("masked loss: %d of %d instance images have no mask and train everywhere",
                        instances - len(self.sources), instances)
        self.entries: dict[tuple[Path, tuple[int, int], bool, tuple[int, int]], torch.Tensor] = {}

    def get(self, examples: list[Example], flips: list[bool], size: tuple[int, int], device: torch.device
            ) -> torch.Tensor:
        """``[B, 1, h, w]`` masks of the examples at the latent grid's ``size`` (ones where there is no mask)."""
        rows = []
        for ex, flip in zip(examples, flips, strict=True):
            key = (ex.image, ex.bucket, flip, size)
            if key not in self.entries:
                source = None if ex.is_class else self.sources.get(ex.image)
                if source is None:
                    self.entries[key] = torch.ones(1, *size)
                else:
                    pixels = load_mask(ex.image, source, ex.bucket, flip)
                    self.entries[key] = F.interpolate(pixels[None], size=size, mode="area")[0]
            rows.append(self.entries[key])
        return torch.stack(rows).to(device)
