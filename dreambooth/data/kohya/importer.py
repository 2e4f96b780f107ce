"""Fill a model's concepts (and the settings that map) from a kohya dataset: a dataset TOML, or a folder of
``<repeats>_<name>`` subfolders. One call for the CLI, the API and the tab.

Everything is read and checked before ``db_config.json`` is written (atomically), so a bad dataset changes
nothing. The result says what was imported, what could not be carried over, and the run's total-steps formula.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...config import load_config
from ...errors import UserError
from ...store import ModelDir
from ..steps import count_steps
from .dataset_toml import import_dataset_toml
from .folders import scan_kohya_folders

log = logging.getLogger(__name__)


@dataclass
class KohyaImport:
    concepts: int
    settings: dict[str, object]
    notes: list[str] = field(default_factory=list)
    total_steps: int = 0
    formula: str = ""

    def summary(self) -> str:
        """One line for a person: what was imported, and the total-steps formula."""
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return (f"imported {self.concepts} concept{'s' if self.concepts != 1 else ''}"
                + (f" and {settings}" if settings else "") + f"; total steps: {self.formula}")

    def to_dict(self) -> dict[str, object]:
        return {"concepts": self.concepts, "settings": self.settings, "notes": self.notes,
                "total_steps": self.total_steps, "formula": self.formula}


def import_kohya(model: ModelDir, source: str | Path, reg_folder: str | Path | None = None) -> KohyaImport:
    """Replace ``model``'s concepts with those of the kohya dataset ``source`` (a ``.toml`` file, or a folder of
    ``<repeats>_<name>`` folders with ``reg_folder`` for class images) and apply the settings it sets."""
    source = Path(str(source).strip()).expanduser()
    if not str(source) or str(source) == ".":
        raise UserError("no kohya dataset given", "give a dataset .toml file or a folder of <repeats>_<name> folders")
    cfg = load_config(model.path)
    notes: list[str] = []
    settings: dict[str, object] = {}
    if source.is_file():
        if reg_folder:
            raise UserError("a regularization folder goes with a folder of <repeats>_<name> folders, not a TOML",
                            "put the reg subsets (is_reg = true) into the TOML instead")
        concepts, settings, notes = import_dataset_toml(source)
    elif source.is_dir():
        reg = Path(str(reg_folder).strip()).expanduser() if reg_folder and str(reg_folder).strip() else None
        if reg is not None and not reg.is_dir():
            raise UserError(f"regularization folder {reg} does not exist", "fix the path or leave it empty")
        concepts = scan_kohya_folders(source, reg, notes=notes)
    else:
        raise UserError(f"kohya dataset {source} does not exist",
                        "give a dataset .toml file or a folder of <repeats>_<name> folders")
    cfg.concepts = concepts
    if cfg.concepts_list_file:
        notes.append(f"the concepts list file {cfg.concepts_list_file} is no longer used: it would replace the "
                     "imported concepts")
        cfg.concepts_list_file = ""
    for key, value in settings.items():
        setattr(cfg, key, value)
    from ..images import list_images  # lazy: images.py imports torch

    pairs = [(len(list_images(c.instance_data_dir)), c.repeats) for c in concepts]
    total, formula = total_steps_formula(pairs, cfg.epochs, cfg.train_batch_size, cfg.gradient_accumulation_steps,
                                         any(c.num_class_images_per > 0 for c in concepts))
    cfg.save(model.path)
    result = KohyaImport(len(concepts), dict(settings), notes, total, formula)
    log.info("%s: %s", model.name, result.summary())
    return result


def total_steps_formula(images_x_repeats: int | Sequence[tuple[int, int]], epochs: int, batch: int,
                        accumulation: int, with_prior: bool) -> tuple[int, str]:
    """The number of optimizer steps of a run and the formula that gives it, as our trainer counts.

    ``images_x_repeats`` is the number of instance images times their repeats, or a list of (images, repeats)
    per concept, which the formula then shows: ``(12 images x 10 repeats) x 2 (prior) x 5 epochs / (batch 2 x
    accumulation 1) = 600 steps``. Prior preservation doubles the items of an epoch (each instance item is paired
    with a class image). Steps are counted per epoch, rounded up (a smaller last batch and a last partial
    accumulation still make a step), then times the epochs; the formula says so when it rounds:
    ``... = 30 steps (10 per epoch, rounded up)``.

    This is exact for one bucket (aspect-ratio buckets off, or all images of one shape). With buckets the real
    count can be larger: each bucket's remainder is a batch of its own (see
    :meth:`~dreambooth.data.dataset.TrainingData.steps_per_epoch`), so with batch size > 1 there can be up to one
    more batch per extra bucket in every epoch.
    """
    if epochs < 0 or batch < 1 or accumulation < 1:
        raise ValueError(f"need epochs >= 0, batch >= 1, accumulation >= 1; got {epochs}, {batch}, {accumulation}")
    if isinstance(images_x_repeats, int):
        if images_x_repeats < 0:
            raise ValueError(f"images_x_repeats must be >= 0, got {images_x_repeats}")
        items = images_x_repeats
        head = f"({items} images x repeats)"
    else:
        pairs = [(int(images), int(repeats)) for images, repeats in images_x_repeats]
        if any(images < 0 or repeats < 1 for images, repeats in pairs):
            raise ValueError(f"need images >= 0 and repeats >= 1, got {pairs}")
        items = sum(images * repeats for images, repeats in pairs)
        head = "(" + " + ".join(f"{images} images x {repeats} repeats" for images, repeats in pairs) + ")"
    per_epoch = items * (2 if with_prior else 1)
    divisor = batch * accumulation
    steps_per_epoch, total = dataclasses.astuple(count_steps(per_epoch, batch, accumulation, epochs))
    prior = " x 2 (prior)" if with_prior else ""
    text = f"{head}{prior} x {epochs} epochs / (batch {batch} x accumulation {accumulation}) = {total} steps"
    if per_epoch % divisor:
        text += f" ({steps_per_epoch} per epoch, rounded up)"
    return total, text
