"""Finding and loading training images safely.

Users point us at folders of photos straight off phones, the web and image editors, so every load is defensive:
the size is read from the header and an image too large to decode safely is refused before any pixel is
decoded; EXIF rotation is applied; transparency, grayscale, CMYK, palette and 16-bit images all come out as
plain 8-bit RGB; and anything unreadable raises :class:`ImageError` naming the file instead of a PIL traceback.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_MARK = ".mask"  # name.mask.png is the loss mask of name.png (data/masks.py), never an image to train on
MAX_IMAGE_PIXELS = 50_000_000  # ~ 8660 x 5773; decoding more can take several GB of RAM

_EXTENSIONS_TEXT = ", ".join(IMAGE_EXTENSIONS)
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transpose / rotate 90: width and height change places
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageError(UserError):
    """An image file that cannot be used: unreadable, corrupt, not an image, or too large."""


def is_mask_file(path: Path) -> bool:
    """A loss mask beside its image (``name.mask.png``): listed with no images."""
    return Path(path).stem.lower().endswith(MASK_MARK)


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension is one we load (case-insensitive), and not a mask."""
    return (not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(path)
            and path.is_file())


def list_images(folder: str | Path, what: str = "instance images") -> list[Path]:
    """The images directly in ``folder``, sorted by name; hidden files and subfolders are ignored.

    Raises :class:`UserError` with a hint when the folder is unset, missing, a file, empty, or holds no images, so
    a wrong path is caught before any model is loaded.
    """
    text = str(folder).strip().strip('"').strip("'").strip() if isinstance(folder, str) else str(folder)
    if not text:
        raise UserError(f"no folder is set for the {what}", f"enter the path of the folder with the {what}")
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{what} folder {path} does not exist", "check the path for typos; it must be a folder "
                        "on the machine that runs the training")
    if not path.is_dir():
        raise UserError(f"{what} folder {path} is a file, not a folder", "enter the folder that holds the images")
    try:
        entries = [p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()]
    except OSError as err:
        raise UserError(f"cannot read the {what} folder {path}: {err.strerror or err}",
                        "check that the folder is readable") from None
    if not entries:
        raise UserError(f"{what} folder {path} is empty", f"put the {what} ({_EXTENSIONS_TEXT}) into it")
    images = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(p))
    if not images:
        others = sorted(p.name for p in entries)
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        count = f"{len(entries)} file{'s' if len(entries) != 1 else ''}"
        raise UserError(f"{what} folder {path} contains {count} but no images ({_EXTENSIONS_TEXT}): {shown}",
                        f"convert the images to one of {_EXTENSIONS_TEXT}, or pick the folder that holds them")
    return images


def _too_large(path: Path, width: int, height: int) -> ImageError:
    return ImageError(f"image {path} is too large: {width}x{height} = {width * height:,} pixels "
                      f"(the limit is {MAX_IMAGE_PIXELS:,})",
                      "scale it down, e.g. to 2048 pixels on the long side; training never uses more than that")


def _open(path: Path) -> Image.Image:
    """Open lazily (header only) and refuse images over :data:`MAX_IMAGE_PIXELS` before anything is decoded."""
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"image {path} is an empty file (0 bytes)", "copy the image again or remove it")
        img = Image.open(path)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning under -W error
        match = _BOMB_PIXELS.search(str(err))
        size = f"{int(match.group(1)):,} pixels" if match else str(err)
        raise ImageError(f"image {path} is too large: {size} (the limit is {MAX_IMAGE_PIXELS:,})",
                         "scale it down, e.g. to 2048 pixels on the long side") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image PIL can read (corrupt, or not really a {path.suffix} file)",
                         "open it in an image viewer; re-save it as PNG or JPEG, or remove it") from None
    except OSError as err:
        if err.errno is None:  # raised by PIL itself for bad data ("Truncated File Read", ...)
            raise ImageError(f"image {path} is corrupt or truncated: {err}",
                             "re-save it from an image editor, or remove it") from None
        raise ImageError(f"cannot read image {path}: {err.strerror or err}",
                         "check that the file exists and is readable") from None
    except MemoryError:
        raise
    except Exception as err:  # a plugin choking on a mangled header: still the user's file, not our bug
        raise ImageError(f"{path} has a broken image header: {type(err).__name__}: {err}",
                         "re-save it from an image editor, or remove it") from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise _too_large(path, width, height)
    if width <= 0 or height <= 0:
        img.close()
        raise ImageError(f"image {path} has no pixels ({width}x{height})", "remove it")
    return img


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation from data already parsed with the header (``getexif`` would decode a whole PNG)."""
    info = img.info
    try:
        raw = info.get("exif")
        if raw is None and "Raw profile type exif" in info:
            raw = bytes.fromhex("".join(str(info["Raw profile type exif"]).split("\n")[3:]))
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(_ORIENTATION_TAG)
            if value is not None:
                return int(value)
        xmp = info.get("XML:com.adobe.xmp")
        if xmp:
            match = re.search(r'tiff:Orientation(="|>)([0-9])', str(xmp))
            if match:
                return int(match.group(2))
    except Exception:  # malformed EXIF: treat as unrotated, load_image decides for real
        return 1
    return 1


def probe_image(path: Path, verify: bool = True) -> tuple[int, int]:
    """(width, height) as :func:`load_image` will return it, read from the header without decoding the pixels.

    EXIF rotations by 90 degrees swap the sides. With ``verify`` broken files are found when the data is scanned:
    PNGs get PIL's cheap CRC check, other formats (where that check does nothing) are decoded once.
    """
    path = Path(path)
    img = _open(path)
    try:
        width, height = img.size
        if _header_orientation(img) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        if verify and img.format == "PNG":
            img.verify()
        elif verify:
            img.load()  # verify() checks nothing for JPEG & co.: decode once, so a truncated file is caught here
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"image {path} is corrupt: {err or type(err).__name__}",
                         "re-save it from an image editor, or remove it") from None
    finally:
        img.close()
    return width, height


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit grayscale (PIL modes I;16* and I) to RGB, scaling 0..65535 to 0..255 (PIL's convert clips)."""
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparent areas become white (the usual background of cut-out subjects)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(img)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` as an upright 8-bit RGB image, or raise :class:`ImageError` naming the file."""
    upright = load_upright(path)
    try:
        return to_rgb(upright)
    except MemoryError:
        raise
    except Exception as err:  # a mode PIL cannot convert: still the user's file, not our bug
        raise ImageError(f"image {path} cannot be converted to RGB: {err or type(err).__name__}",
                         "re-save it as an 8-bit RGB PNG or JPEG, or remove it") from None


def has_alpha(img: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha channel, or a transparent palette entry)."""
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def load_upright(path: Path) -> Image.Image:
    """Decode ``path`` upright (EXIF rotation applied) in its own mode, or raise :class:`ImageError` naming it."""
    path = Path(path)
    img = _open(path)
    try:
        with img:
            img.load()
            try:
                return ImageOps.exif_transpose(img)
            except Exception as err:  # broken EXIF must not cost the image
                log.warning("ignoring the unreadable EXIF orientation of %s: %s", path, err)
                return img.copy()
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise ImageError(f"image {path} is corrupt or truncated: {err or type(err).__name__}",
                         "re-save it from an image editor, or remove it") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as float32 ``[3, H, W]`` in [-1, 1], the range the VAE expects."""
    arr = np.array(img, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div_(127.5).sub_(1.0)
