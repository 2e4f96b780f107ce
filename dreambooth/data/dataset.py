"""The training set: every concept's instance and class images, their captions and buckets, and epoch batches.

Scanning reads only image headers (plus PIL's cheap verify), so a folder of thousands of class images is ready
in seconds and a broken file is reported before the models load. Pixels are decoded only in :meth:`load_pixels`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..config import Concept
from ..errors import UserError
from .buckets import choose_bucket, fit_to_bucket, make_buckets
from .captions import build_prompt, drop_tags, read_caption, real_caption, shuffle_tags
from .images import ImageError, list_images, load_image, probe_image, to_tensor
from .steps import count_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training image with everything needed to load it and build its prompt (hashable: a cache key)."""

    image: Path
    caption_template: str  # the concept's instance prompt or class prompt template
    caption: str  # from read_caption
    concept: int  # concept index
    is_class: bool  # prior-preservation (class) image
    bucket: tuple[int, int]  # (width, height)


def _concept_name(index: int, concept: Concept) -> str:
    token = f" ('{concept.instance_token}')" if concept.instance_token.strip() else ""
    return f"concept {index + 1}{token}"


class TrainingData:
    """All examples of a run and their deterministic order, epoch by epoch.

    Prior preservation pairs every instance item of a concept (repeats included) with one of its class images per
    epoch. The class images are taken in sorted order and the cycle continues from epoch to epoch, so over the
    run every generated class image is used about equally.

    ``validation[i]``: concept i's validation images, never trained on: its validation folder's images and the
    ``validation_holdout`` instance images taken out of ``instances[i]`` (the same ones every run, whatever the seed).
    """

    def __init__(self, concepts: list[Concept], resolution: int, *, enable_buckets: bool, seed: int,
                 class_dirs: list[Path | None] | None = None, bucket_step: int = 64) -> None:
        if not concepts:
            raise UserError("there is no concept to train", "add a concept with an instance images folder")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if class_dirs is not None and len(class_dirs) != len(concepts):
            raise ValueError(f"class_dirs has {len(class_dirs)} entries for {len(concepts)} concepts")
        self.concepts = list(concepts)
        self.resolution = resolution
        self.enable_buckets = enable_buckets
        self.seed = seed
        self.buckets = make_buckets(resolution, bucket_step) if enable_buckets else [(resolution, resolution)]
        self.skipped: list[tuple[Path, str]] = []
        self.instances: list[list[Example]] = []
        self.classes: list[list[Example]] = []
        self.validation: list[list[Example]] = []
        self._warned_batch_size = False
        for index, concept in enumerate(self.concepts):
            override = class_dirs[index] if class_dirs is not None else None
            instances, held_out = self._hold_out(index, concept, self._scan_instances(index, concept))
            self.instances.append(instances)
            self.classes.append(self._scan_classes(index, concept, override))
            self.validation.append(held_out + self._scan_validation(index, concept))
        self.instance_items_per_epoch = sum(len(items) * concept.repeats
                                            for items, concept in zip(self.instances, self.concepts, strict=True))

    # ------------------------------------------------------------------------------------------------ scanning

    def _scan_instances(self, index: int, concept: Concept) -> list[Example]:
        return self._scan_prompted(index, concept, concept.instance_data_dir, "instance images", "images")

    def _scan_prompted(self, index: int, concept: Concept, folder: str, what: str, counted: str) -> list[Example]:
        """The usable images of ``folder`` with the concept's instance prompt; refuses a folder with none."""
        name = _concept_name(index, concept)
        try:
            paths = list_images(folder, what)
        except UserError as err:
            raise UserError(f"{name}: {err.message}", err.hint) from None
        examples = self._scan(paths, index, concept.instance_prompt, is_class=False)
        if not examples:
            raise UserError(f"{name}: none of the {len(paths)} {counted} in {folder} can be used "
                            f"({self._first_reason(paths)})", "fix or replace the images listed in the log")
        return examples

    def _hold_out(self, index: int, concept: Concept, examples: list[Example]) -> tuple[list[Example], list[Example]]:
        """(the instance examples that train, the ``validation_holdout`` ones held out for validation)."""
        count = concept.validation_holdout
        if count <= 0:
            return examples, []
        if count >= len(examples):
            raise UserError(f"{_concept_name(index, concept)}: {count} of its {len(examples)} instance images are held "
                            "out for validation, which leaves none to train on",
                            "hold out fewer images (one in five is usual), or add images")
        picked = set(random.Random(f"dreambooth-holdout:{index}").sample(range(len(examples)), count))
        return ([ex for i, ex in enumerate(examples) if i not in picked],
                [ex for i, ex in enumerate(examples) if i in picked])

    def _scan_validation(self, index: int, concept: Concept) -> list[Example]:
        if not concept.validation_data_dir.strip():
            return []
        return self._scan_prompted(index, concept, concept.validation_data_dir, "validation images",
                                   "validation images")

    def _scan_classes(self, index: int, concept: Concept, override: Path | None) -> list[Example]:
        if concept.num_class_images_per <= 0:
            return []
        name = _concept_name(index, concept)
        hint = ("generate the class images first (starting the training does it), or set 'Class images per "
                "instance image' to 0 to turn prior preservation off")
        folder: str | Path = override if override is not None else concept.class_data_dir
        if not str(folder).strip():
            raise UserError(f"{name}: prior preservation is on but no class images folder is set", hint)
        try:
            paths = list_images(folder, "class images")
        except UserError as err:
            raise UserError(f"{name}: {err.message}", hint) from None
        examples = self._scan(paths, index, concept.class_prompt, is_class=True)
        if not examples:
            raise UserError(f"{name}: none of the {len(paths)} class images in {folder} can be used "
                            f"({self._first_reason(paths)})", hint)
        return examples

    def _first_reason(self, paths: list[Path]) -> str:
        wanted = set(paths)
        reasons = [reason for path, reason in self.skipped if path in wanted]
        return reasons[0] if reasons else "no reason recorded"

    def _scan(self, paths: list[Path], index: int, template: str, *, is_class: bool) -> list[Example]:
        """Examples for the usable images among ``paths``; unusable ones are logged and kept in ``skipped``."""
        examples = []
        for path in paths:
            try:
                width, height = probe_image(path)
            except ImageError as err:
                self.skipped.append((path, err.message))
                log.warning("skipping %s image %s: %s", "class" if is_class else "instance", path, err.message)
                continue
            bucket = (choose_bucket(width, height, self.buckets) if self.enable_buckets
                      else (self.resolution, self.resolution))
            examples.append(Example(path, template, read_caption(path), index, is_class, bucket))
        return examples

    # ------------------------------------------------------------------------------------------------- epochs

    def all_examples(self) -> list[Example]:
        """Every distinct example (instance and class), e.g. to cache latents once before training."""
        return [ex for items in self.instances + self.classes for ex in items]

    def _epoch_items(self, epoch: int) -> list[Example]:
        items: list[Example] = []
        for concept, instances, classes in zip(self.concepts, self.instances, self.classes, strict=True):
            repeated = [ex for ex in instances for _ in range(concept.repeats)]
            items.extend(repeated)
            if classes:
                start = epoch * len(repeated)
                items.extend(classes[(start + k) % len(classes)] for k in range(len(repeated)))
        return items

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[Example]]:
        """The batches of ``epoch``, the same for the same (seed, epoch); each batch holds one bucket only.

        Items are shuffled, grouped by bucket and cut into batches; a bucket's remainder is a smaller last batch
        (nothing is dropped), and the order of the batches is shuffled too.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = self._epoch_items(epoch)
        if batch_size > len(items) and not self._warned_batch_size:
            self._warned_batch_size = True
            log.warning("batch size %d is larger than the %d images per epoch; batches will hold at most %d",
                        batch_size, len(items), len(items))
        rng = random.Random(f"dreambooth-data:{self.seed}:{epoch}")
        rng.shuffle(items)
        by_bucket: dict[tuple[int, int], list[Example]] = {}
        for ex in items:
            by_bucket.setdefault(ex.bucket, []).append(ex)
        batches = [group[i:i + batch_size] for group in by_bucket.values() for i in range(0, len(group), batch_size)]
        rng.shuffle(batches)
        return batches

    def steps_per_epoch(self, batch_size: int, grad_accum: int, epoch: int = 0) -> int:
        """Optimizer steps in ``epoch``: ceil(batches / grad_accum).

        The count is the same for every epoch unless one concept's class images fall into different buckets.
        """
        batches = self.epoch_batches(epoch, batch_size)
        return count_steps(sum(map(len, batches)), batch_size, grad_accum, 1, batches=len(batches)).per_epoch

    # ------------------------------------------------------------------------------------------- per example

    def load_pixels(self, ex: Example, flip: bool, rng: random.Random | None = None) -> torch.Tensor:
        """float32 ``[3, H, W]`` in [-1, 1] at ``ex.bucket`` (centre crop, random crop with ``rng``), mirrored if
        ``flip``. Raises :class:`ImageError` naming the file if it cannot be decoded."""
        img = fit_to_bucket(load_image(ex.image), ex.bucket, rng)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    def prompt_for(self, ex: Example, *, shuffle: bool, keep_tokens: int, rng: random.Random,
                   caption_dropout: float = 0.0, tag_dropout: float = 0.0) -> str:
        """The training prompt of ``ex``; class images never get the instance token (they are not the subject).

        An instance image's prompt is empty with probability ``caption_dropout``, else each of its tags after the
        first ``keep_tokens`` is left out with probability ``tag_dropout`` (after shuffling); class prompts stay
        whole. ``rng`` is drawn from only for what is switched on, so runs without them repeat as before."""
        if caption_dropout > 0 and not ex.is_class and rng.random() < caption_dropout:
            return ""
        concept = self.concepts[ex.concept]
        instance_token = "" if ex.is_class else concept.instance_token
        prompt = build_prompt(ex.caption_template, ex.caption, instance_token, concept.class_token)
        prompt = shuffle_tags(prompt, keep_tokens, rng) if shuffle else prompt
        return drop_tags(prompt, keep_tokens, tag_dropout, rng) if tag_dropout > 0 and not ex.is_class else prompt

    def tag_prompts(self) -> dict[str, list[str]]:
        """Per image folder, the prompt each image trains with (unshuffled), where a file name that is no caption
        (:func:`~.captions.real_caption`: ``img0``, ``DSC00012``) counts as none: what a LoRA's ``ss_tag_frequency``
        counts, as kohya counts the caption each image trains with."""
        prompts: dict[str, list[str]] = {}
        for ex in self.all_examples():
            concept = self.concepts[ex.concept]
            prompt = build_prompt(ex.caption_template, real_caption(ex.image, ex.caption),
                                  "" if ex.is_class else concept.instance_token, concept.class_token)
            prompts.setdefault(ex.image.parent.name, []).append(prompt)
        return prompts


def check_instance_prompts(concepts: list[Concept], resolution: int, enable_buckets: bool, seed: int) -> list[str]:
    """Refuse missing folders and unusable images or captions, and an image whose training prompt is empty, before
    any model loads (class images are checked once they exist). Returns every instance image's training prompt."""
    concepts = [dataclasses.replace(c, num_class_images_per=0) for c in concepts]
    prompts = []
    for ex in TrainingData(concepts, resolution, enable_buckets=enable_buckets, seed=seed).all_examples():
        concept = concepts[ex.concept]
        prompts.append(build_prompt(ex.caption_template, ex.caption, concept.instance_token, concept.class_token))
        if not prompts[-1]:
            raise UserError(f"the training prompt of {ex.image} is empty (the prompt {ex.caption_template!r} "
                            f"with its caption {ex.caption!r})",
                            "write the captions into the .txt files beside the images, or set an instance "
                            "prompt or instance token")
    return prompts
