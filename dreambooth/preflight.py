"""The checks of a run's inputs that need no model loaded: made when a run is asked for (``jobs.start``: the API's
400, the tab's message) and again when it begins (``train/loop.py``: the CLI's exit), so a bad concept is reported
at once instead of by a worker that failed after the models loaded (or, worse, by a run that trained nothing).

What is checked: concepts exist; every instance folder exists and holds usable images with non-empty prompts;
prior preservation that still has class images to generate has a class prompt to generate them with; and what the
training method needs of the prompts (textual inversion: its word is in them).
"""

from __future__ import annotations

import logging
import re

from .config import Concept, TrainConfig, check_applies, resolve_concepts
from .errors import UserError
from .families import get_family
from .store import ModelDir

log = logging.getLogger(__name__)


def check_run(model: ModelDir, cfg: TrainConfig, resume: bool = False) -> list[str]:
    """Raise :class:`UserError` naming what is wrong and how to fix it; return the notes a run should show (things
    that are allowed but probably not meant)."""
    from .data.dataset import check_instance_prompts  # lazy: torch and PIL
    from .train.methods import method_class
    from .train.resume import list_states
    from .train.validation import check_validation

    concepts = resolve_concepts(cfg)
    check_applies(cfg, "zero_terminal_snr", False)  # v-prediction only
    check_validation(cfg, concepts)
    resolution = cfg.resolution or get_family(cfg.family).resolution
    prompts = check_instance_prompts(concepts, resolution, cfg.enable_buckets, cfg.seed)
    for index, concept in enumerate(concepts):
        _check_class_prompt(model, index, concept)
    notes = method_class(cfg.method).check_prompts(cfg, prompts)
    if resume and not list_states(model.checkpoints):
        notes.append(f"resume: there is no resume state in {model.checkpoints}; this run starts from the working "
                     "weights at step 0 (the earlier loss log is kept)")
    for note in notes:
        log.warning("%s", note)
    return notes


def _check_class_prompt(model: ModelDir, index: int, concept: Concept) -> None:
    """Prior preservation with class images still to generate needs a class prompt (checked by the generator only
    once the models are loaded)."""
    from .data.images import list_images

    per = concept.num_class_images_per
    if per <= 0 or re.sub(r"\[filewords\]|[\s,]", "", concept.class_prompt):
        return
    folder = model.class_images(index, concept.class_data_dir)
    needed = per * len(list_images(concept.instance_data_dir))
    try:
        have = len(list_images(folder, "class images"))
    except UserError:  # no folder yet, or no images in it
        have = 0
    if have < needed:
        raise UserError(f"concept {index + 1}: prior preservation needs {needed - have} more class images in "
                        f"{folder}, and the concept has no class prompt to generate them with",
                        "set its class prompt (e.g. 'a photo of a dog'), put the class images into that folder, or "
                        "set 'Class images per instance image' to 0")
