"""Fill a model's concepts (and the settings that map) from a kohya dataset: a dataset TOML, or a folder of
``<repeats>_<name>`` subfolders. One call for the CLI, the API and the tab; the rules are in ``data/kohya.py``.

Everything is read and checked before ``db_config.json`` is written (atomically), so a bad dataset changes
nothing. The result says what was imported, what could not be carried over, and the run's total-steps formula.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import load_config
from .data.images import list_images
from .data.kohya import import_dataset_toml, scan_kohya_folders, total_steps_formula
from .errors import UserError
from .store import ModelDir

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
    pairs = [(len(list_images(c.instance_data_dir)), c.repeats) for c in concepts]
    total, formula = total_steps_formula(pairs, cfg.epochs, cfg.train_batch_size, cfg.gradient_accumulation_steps,
                                         any(c.num_class_images_per > 0 for c in concepts))
    cfg.save(model.path)
    result = KohyaImport(len(concepts), dict(settings), notes, total, formula)
    log.info("%s: %s", model.name, result.summary())
    return result
