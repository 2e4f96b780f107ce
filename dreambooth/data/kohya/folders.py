"""kohya's folder convention: ``<repeats>_<name>`` folders of images (``train_data_dir``, ``reg_data_dir``) as
concepts; the rules are in the package docstring."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ...config import Concept
from ...errors import ConfigError, UserError
from .subsets import (
    Subset,
    attach_regs,
    guess_extension,
    limits,
    list_subset_images,
    note,
    prompt_template,
    split_class_tokens,
)

log = logging.getLogger(__name__)

_FOLDER_NAME = re.compile(r"^(\d+)_(.*)$", re.DOTALL)


def _scan_parent(parent: Path, what: str, notes: list[str], *, reg: bool) -> list[Subset]:
    parent = Path(parent).expanduser()
    if not parent.is_dir():
        raise ConfigError(f"{what} folder {parent} does not exist or is not a folder",
                          f"pick the folder that holds the <repeats>_<name> folders (kohya's "
                          f"{'reg_data_dir' if reg else 'train_data_dir'})")
    low, high = limits("repeats", Concept)
    found: list[Subset] = []
    for entry in sorted(parent.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue  # .DS_Store, .ipynb_checkpoints, ...: never meant as data
        place = str(entry)
        if not entry.is_dir():
            note(notes, f"{place}: not a folder; kohya's convention wants <repeats>_<name> folders here, ignored")
            continue
        match = _FOLDER_NAME.match(entry.name)
        if match is None:
            note(notes, f"{place}: the name does not match <repeats>_<name> (e.g. '10_shs girl'); ignored")
            continue
        repeats = int(match.group(1))
        if not (low or 1) <= repeats <= (high or repeats):
            note(notes, f"{place}: {repeats} repeats is outside {low:g} to {high:g}; ignored")
            continue
        try:
            images = list_subset_images(entry, "class images" if reg else "instance images")
        except UserError as err:
            note(notes, f"{place}: {err.message}; ignored")
            continue
        tokens = " ".join(match.group(2).split())
        ext, source = guess_extension(images, place, notes, folders=True)
        template = prompt_template(images, tokens, ext, f"{place} ({ext} is {source})", entry, place, notes, reg=reg)
        found.append(Subset(place, entry.absolute(), images, tokens, template, repeats))
    return found


def scan_kohya_folders(parent: Path, reg_parent: Path | None = None, *,
                       notes: list[str] | None = None) -> list[Concept]:
    """Concepts from kohya's folder convention: ``parent/<repeats>_<name>/`` holds the images of one concept.

    ``train/10_shs girl/`` gives repeats 10 and the tokens ``shs`` / ``girl`` (split as in the package docstring);
    the prompt is ``[filewords]`` when the images have ``.txt`` captions (kohya run with
    ``--caption_extension .txt``), else the name itself. Entries that do not fit (a name without ``<repeats>_``,
    repeats outside 1..1000, a folder without images, a plain file) are reported in ``notes`` (and logged), not
    silently skipped; hidden entries are ignored. Everything after the first ``_`` is the name, underscores
    included, as in kohya.

    ``reg_parent`` (kohya's ``reg_data_dir``, e.g. ``reg/1_girl/``) gives the class images: each concept takes the
    reg folder whose name equals its class token, else the first one (noted); the class prompt is the folder's
    name and ``num_class_images_per`` is derived from the image counts as for a TOML's reg subsets.
    """
    notes = notes if notes is not None else []
    found = _scan_parent(parent, "training images", notes, reg=False)
    if not found:
        raise ConfigError(f"{parent} holds no <repeats>_<name> folder with images",
                          "make one folder per concept named like '10_shs girl' with the images in it")
    concepts: list[tuple[Subset, Concept]] = []
    for info in found:
        instance_token, class_token = split_class_tokens(info.tokens)
        concepts.append((info, Concept(instance_data_dir=str(info.folder), instance_prompt=info.template,
                                       instance_token=instance_token, class_token=class_token,
                                       repeats=info.repeats)))
    if reg_parent is not None:
        regs = _scan_parent(reg_parent, "regularization images", notes, reg=True)
        if not regs:
            note(notes, f"{reg_parent} holds no <repeats>_<name> folder with images; no class images are set")
        for info in regs:
            if info.repeats != 1:
                note(notes, f"{info.place}: {info.repeats} repeats change nothing here: each instance image is "
                             "paired with one class image per epoch")
        attach_regs(concepts, regs, str(parent), notes, {})
    return [concept for _, concept in concepts]
