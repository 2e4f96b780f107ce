"""What the kohya readers share: a subset of images (a TOML subset or a ``<repeats>_<name>`` folder), its prompt
template, its class tokens, and how regularization images become a concept's class images (the rules are in the
package docstring)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ...config import Concept, field_specs
from ...errors import ConfigError

log = logging.getLogger(__name__)

FILEWORDS = "[filewords]"
SUPPORTED_CAPTION_EXTENSION = ".txt"
KOHYA_DEFAULT_CAPTION_EXTENSION = ".caption"


def note(notes: list[str], text: str) -> None:
    log.warning("%s", text)
    notes.append(text)


def limits(name: str, cls: type) -> tuple[float | None, float | None]:
    spec = next(s for s in field_specs(cls) if s.name == name)
    return spec.minimum, spec.maximum


def split_class_tokens(tokens: str) -> tuple[str, str]:
    """kohya's ``class_tokens`` as (instance token, class token): split at the first space or comma.

    ``"shs girl"`` -> ``("shs", "girl")``, ``"shs, 1girl"`` -> ``("shs", "1girl")``, ``"shs"`` -> ``("shs", "")``.
    """
    text = " ".join(tokens.split())
    match = re.match(r"([^\s,]+)[\s,]*(.*)$", text)
    if match is None:
        return "", ""
    return match.group(1), match.group(2).strip(" ,")


def normal_tokens(text: str) -> str:
    return " ".join(text.replace(",", " ").split()).lower()


def list_subset_images(folder: Path, what: str) -> list[Path]:
    from ..images import list_images  # lazy: images.py imports torch

    return list_images(folder, what)


def caption_ext(ext: str) -> str:
    ext = ext.strip()
    return ext if ext.startswith(".") or not ext else "." + ext


def guess_extension(images: list[Path], place: str, notes: list[str], *, folders: bool = False) -> tuple[str, str]:
    """The caption extension where none is set: kohya's command line (unknown here) or its default ``.caption``.

    Returns (extension, how it was chosen). ``.caption`` files beside the images are what kohya's default reads;
    else ``.txt`` files are taken as the captions (kohya run with ``--caption_extension .txt``); in a TOML that is
    noted, in the folder convention it is the expected case.
    """
    if any(p.with_suffix(KOHYA_DEFAULT_CAPTION_EXTENSION).is_file() for p in images):
        return KOHYA_DEFAULT_CAPTION_EXTENSION, "kohya's default"
    if not folders and any(p.with_suffix(SUPPORTED_CAPTION_EXTENSION).is_file() for p in images):
        note(notes, f"{place}: caption_extension is not set; the .txt files beside its images are taken as the "
                     "captions (as kohya run with --caption_extension .txt)")
    return SUPPORTED_CAPTION_EXTENSION, ""


def prompt_template(images: list[Path], tokens: str, ext: str, ext_label: str, folder: Path, place: str,
              notes: list[str], *, reg: bool) -> str:
    """The prompt template of a subset's images (the rules are in the package docstring)."""
    with_ext = [p for p in images if p.with_suffix(ext).is_file()] if ext else []
    if ext != SUPPORTED_CAPTION_EXTENSION:
        if with_ext:
            shown = ", ".join(p.with_suffix(ext).name for p in with_ext[:2]) + (", ..." if len(with_ext) > 2 else "")
            raise ConfigError(f"{ext_label}: {folder} holds {len(with_ext)} caption "
                              f"file(s) with {ext!r} ({shown}), which this trainer does not read: it reads captions "
                              f"from .txt files only, and training without them would use other prompts",
                              f"rename the caption files to .txt and set caption_extension = \".txt\" in {place}")
        with_ext = []
    what = "class images" if reg else "images"
    if with_ext:
        missing = len(images) - len(with_ext)
        if missing:
            fallback = f"class_tokens {tokens!r}" if tokens else "an empty caption"
            note(notes, f"{place}: {missing} of the {len(images)} {what} in {folder} have no {ext} caption: kohya "
                         f"trains them with {fallback}, here they are captioned from their file names")
        return FILEWORDS
    if tokens:
        return tokens
    note(notes, f"{place}: no class_tokens and no {SUPPORTED_CAPTION_EXTENSION} captions: kohya trains its "
                 f"{what} with an empty caption, here they are captioned from their file names ([filewords])")
    return FILEWORDS



@dataclass
class Subset:
    place: str
    folder: Path
    images: list[Path]
    tokens: str
    template: str
    repeats: int


def pick_reg(concept: Concept, place: str, regs: list[Subset], notes: list[str]) -> Subset:
    if len(regs) == 1:
        return regs[0]
    wanted = normal_tokens(concept.class_token)
    for reg in regs:
        if wanted and normal_tokens(reg.tokens) == wanted:
            return reg
    note(notes, f"{place}: none of the regularization image sets has its class token {concept.class_token!r} "
                 f"as its class_tokens; using the first one ({regs[0].place}) as its class images")
    return regs[0]


def attach_regs(instances: list[tuple[Subset, Concept]], regs: list[Subset], scope: str, notes: list[str],
                 held: dict[str, int]) -> None:
    """Give each instance concept of ``scope`` (a dataset, or the training folder) its class images from ``regs``.

    ``held`` counts the images per class folder as the trainer will leave them: it generates what a concept
    lacks, concept by concept.
    """
    if not regs:
        return
    if not instances:
        note(notes, f"{scope}: its regularization images have no concept in the same dataset to serve; they are "
                     "not used")
        return
    used: set[str] = set()
    for info, concept in instances:
        reg = pick_reg(concept, info.place, regs, notes)
        used.add(reg.place)
        set_class_images(concept, info, reg, notes, held)
    for reg in regs:
        if reg.place not in used:
            note(notes, f"{reg.place}: no concept of {scope} has the class token {reg.tokens!r}; these class "
                         "images are not used")


def set_class_images(concept: Concept, info: Subset, reg: Subset, notes: list[str], held: dict[str, int]) -> None:
    high = limits("num_class_images_per", Concept)[1] or 1000
    per = max(1, min(int(high), len(reg.images) // len(info.images)))
    concept.class_data_dir = str(reg.folder)
    concept.class_prompt = reg.template
    concept.num_class_images_per = per
    have = held.get(concept.class_data_dir, len(reg.images))
    needed = per * len(info.images)
    if needed > have:
        note(notes, f"{info.place}: {reg.place} has {have} class images for {len(info.images)} instance images; "
                     f"the trainer generates the missing {needed - have} into {reg.folder} before training (kohya "
                     "repeats the reg images instead)")
    held[concept.class_data_dir] = max(have, needed)
