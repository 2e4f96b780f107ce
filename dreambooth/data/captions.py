"""Captions and prompts: each image's caption, the concept's prompt template around it, tag shuffling.

Caption of an image (:func:`read_caption`):

1. the text file beside it with the same stem (``dog01.png`` -> ``dog01.txt``), UTF-8, stripped; it may be empty;
2. otherwise its file name, cleaned: leading numbering (``001-``, ``01_``, ``3.``, ``(1)``) and a trailing copy
   number (``dog (2)``) are removed and ``_`` becomes a space, so ``003-a_photo_of_dog (2).jpg`` gives
   ``a photo of dog``. Numbers that are part of a word stay (``1girl_smiling`` -> ``1girl smiling``); a name
   that is only a number (``0042.png``) gives an empty caption.

Prompt of an image (:func:`build_prompt`), following the old DreamBooth extension: ``[filewords]`` in the template
is replaced by the caption, and the instance token is put in front of the class token when the caption names the
class but not the subject, so ``a photo of dog`` trains as ``a photo of ohwx dog``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..errors import UserError

FILEWORDS = "[filewords]"
INSTANCE_PLACEHOLDER = "[instance_token]"
CLASS_PLACEHOLDER = "[class_token]"
MAX_CAPTION_BYTES = 64 * 1024  # a caption is a line or two; far more is the wrong file (and would stall tokenizing)

_LEADING_NUMBER = re.compile(r"^\s*(?:\(\d+\)|\d+(?=[-_.\s])[-_.\s]*)\s*")
_TRAILING_COPY = re.compile(r"\s*\(\d+\)\s*$")
_SPACES = re.compile(r"\s+")
# file names that are not captions: one word glued to or followed by numbers (a camera's or a generator's numbering),
# and hex digests / UUIDs
_NUMBERED_NAME = re.compile(r"^[^\W\d_]+(?:[\s._-]*\d+)+$")
_HASH_NAME = re.compile(r"^(?=.*\d)[0-9a-f]{8,}(?:[\s-][0-9a-f]{4,})*$", re.IGNORECASE)


def caption_from_name(stem: str) -> str:
    """A caption from a file name without extension (the rule is in the module docstring)."""
    text = stem.replace("_", " ")
    text = _TRAILING_COPY.sub("", text)
    text = _LEADING_NUMBER.sub("", text, count=1)
    text = _SPACES.sub(" ", text).strip()
    return "" if text.isdigit() else text


def read_caption(image_path: Path) -> str:
    """The caption of ``image_path``: its ``.txt`` sidecar if there is one, else its cleaned file name."""
    image_path = Path(image_path)
    sidecar = image_path.with_suffix(".txt")
    if sidecar.is_file():
        try:
            size = sidecar.stat().st_size
            if size > MAX_CAPTION_BYTES:
                raise UserError(f"caption file {sidecar} is {size:,} bytes long; the limit is {MAX_CAPTION_BYTES:,}",
                                "a caption is a short text (CLIP reads 75 tokens); check that it is the right file "
                                "and shorten it")
            return sidecar.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError:
            raise UserError(f"caption file {sidecar} is not UTF-8 text",
                            "save it as UTF-8 in a text editor") from None
        except OSError as err:
            raise UserError(f"cannot read caption file {sidecar}: {err.strerror or err}",
                            "check that it is readable") from None
    return caption_from_name(image_path.stem)


def real_caption(image_path: Path, caption: str) -> str:
    """``caption`` (:func:`read_caption` of ``image_path``) when it describes the image: the ``.txt`` caption, or a
    file name made of words (``a_red_dog.png``); ``""`` for a file name that only names or numbers the image
    (``img0``, ``IMG_1234``, ``DSC00012``, ``class_3_81234`` of a generated class image, a hash or UUID)."""
    if not caption or Path(image_path).with_suffix(".txt").is_file():
        return caption
    return "" if _NUMBERED_NAME.match(caption) or _HASH_NAME.match(caption) else caption


def _word(token: str) -> re.Pattern[str]:
    """``token`` as a whole word, case-insensitive (``dog`` is not found in ``hotdog``)."""
    return re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", re.IGNORECASE)


def _insert_instance(caption: str, template: str, instance_token: str, class_token: str) -> str:
    """Put the instance token before the first class token of a caption that names the class but not the subject."""
    if not instance_token or not class_token:
        return caption
    has_instance = INSTANCE_PLACEHOLDER in template or _word(instance_token).search(template + " " + caption)
    if has_instance:
        return caption
    match = _word(class_token).search(caption)
    if match is None:
        return caption
    return f"{caption[:match.start()]}{instance_token} {caption[match.start():]}"


def clean_prompt(prompt: str) -> str:
    """Collapse whitespace and the empty tags an empty caption leaves (``"a dog, , "`` -> ``"a dog"``)."""
    text = _SPACES.sub(" ", prompt).strip()
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(?:\s*,)+", ",", text)
    return text.strip(" ,")


def build_prompt(template: str, caption: str, instance_token: str = "", class_token: str = "") -> str:
    """The training prompt of one image from its concept's template and its caption.

    An empty template is the caption alone (as if it were ``[filewords]``). A template without ``[filewords]``
    is used as is. ``[instance_token]`` and ``[class_token]`` are replaced by the tokens.
    """
    caption = caption.strip()
    template = template.strip() or FILEWORDS
    if FILEWORDS in template:
        caption = _insert_instance(caption, template, instance_token, class_token)
        prompt = template.replace(FILEWORDS, caption)
    else:
        prompt = template
    prompt = prompt.replace(INSTANCE_PLACEHOLDER, instance_token).replace(CLASS_PLACEHOLDER, class_token)
    return clean_prompt(prompt)


def shuffle_tags(prompt: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle the comma-separated tags of ``prompt`` after the first ``keep_tokens``, so no tag order is learnt."""
    tags = [tag.strip() for tag in prompt.split(",")]
    tags = [tag for tag in tags if tag]
    keep = max(0, keep_tokens)
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def drop_tags(prompt: str, keep_tokens: int, rate: float, rng: random.Random) -> str:
    """Leave out each comma-separated tag after the first ``keep_tokens`` with probability ``rate`` (kohya's
    caption tag dropout), so the model does not tie the subject to every tag of its captions."""
    tags = [tag.strip() for tag in prompt.split(",")]
    tags = [tag for tag in tags if tag]
    keep = max(0, keep_tokens)
    return ", ".join(tags[:keep] + [tag for tag in tags[keep:] if rng.random() >= rate])
