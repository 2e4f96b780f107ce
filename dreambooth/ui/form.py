"""The settings form, generated from ``config.field_specs``: one control per setting, and the exact conversions
between a :class:`TrainConfig` and the list of control values. No gradio here, so all of it is tested plainly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import gpus
from ..config import Concept, FieldSpec, TrainConfig, coerce, field_specs, load_concepts_file
from ..data.steps import count_steps
from ..errors import ConfigError, UserError

log = logging.getLogger(__name__)

CONCEPT_PANELS = 3
SLIDER_SPAN = 1000  # ints whose whole range is at most this wide get a slider; other numbers a number box

# group id -> title, in the order the groups are shown
SETTING_GROUPS = {
    "method": "Training method",
    "lora": "LoRA",
    "embedding": "Textual inversion",
    "hypernetwork": "Hypernetwork",
    "intervals": "Intervals",
    "batching": "Batching",
    "learning_rate": "Learning rate and optimizer",
    "performance": "Performance and memory",
    "images": "Image processing and prompts",
    "loss": "Loss and text encoder",
    "saving": "Saving",
    "validation": "Validation",
}
CONCEPT_GROUPS = {"instance": "Instance images", "class": "Class images (prior preservation)",
                  "samples": "Previews", "validation": "Validation"}


@dataclass(frozen=True)
class Control:
    """One generated control: which setting it edits (of the config, or of concept panel ``concept``)."""

    spec: FieldSpec
    concept: int | None = None  # None: a TrainConfig setting; else the concept panel's index

    @property
    def kind(self) -> str:
        return control_kind(self.spec)

    @property
    def elem_id(self) -> str:
        """``dbt_<name>`` for a config setting, ``dbt_c<i>_<name>`` for concept panel ``i`` (0-based).

        Not ``db_``: the older DreamBooth extension, which may be installed beside this one, uses that prefix."""
        return f"dbt_{self.spec.name}" if self.concept is None else f"dbt_c{self.concept}_{self.spec.name}"

    @property
    def where(self) -> str:
        return "" if self.concept is None else f"Concept {self.concept + 1}: "


def control_kind(spec: FieldSpec) -> str:
    """The spec's own kind (``gpus``: this machine's GPUs to tick); else bool -> checkbox; choices -> dropdown; an
    int with a narrow range -> slider; other numbers -> number; str -> textbox. Floats never get a slider: a range
    input snaps to its step and would change e.g. 0.9999."""
    if spec.kind is not None:
        return spec.kind
    if spec.type is bool:
        return "checkbox"
    if spec.choices is not None:
        return "dropdown"
    if spec.type is int:
        narrow = (spec.minimum is not None and spec.maximum is not None
                  and spec.maximum - spec.minimum <= SLIDER_SPAN)
        return "slider" if narrow else "number"
    if spec.type is float:
        return "number"
    return "textbox"


def config_controls() -> list[Control]:
    """Every TrainConfig setting shown in the UI, in declaration order."""
    return [Control(s) for s in field_specs(TrainConfig) if s.ui]


def concept_controls(index: int) -> list[Control]:
    return [Control(s, index) for s in field_specs(Concept) if s.ui]


def all_controls(panels: int = CONCEPT_PANELS) -> list[Control]:
    """The form: the config's settings, then each concept panel's. Values lists follow this order."""
    controls = config_controls()
    for index in range(panels):
        controls += concept_controls(index)
    return controls


# ---------------------------------------------------------------------------------------------------- conversion


def config_to_values(cfg: TrainConfig, controls: list[Control]) -> list[Any]:
    """The control values that show ``cfg``; panels past the config's concepts show a default concept."""
    blank = Concept()
    values = []
    for control in controls:
        if control.kind == "gpus":
            values.append(gpus.choices(getattr(cfg, control.spec.name))[1])  # the ticked GPUs' labels
        elif control.concept is None:
            values.append(getattr(cfg, control.spec.name))
        else:
            concept = cfg.concepts[control.concept] if control.concept < len(cfg.concepts) else blank
            values.append(getattr(concept, control.spec.name))
    return values


def _from_control(control: Control, value: Any) -> Any:
    """A control's value as the setting's type, checked against the setting's range and choices."""
    spec = control.spec
    name = f"{control.where}{spec.label}"
    if control.kind == "gpus":
        value = gpus.from_choices(value)
    if spec.type is str:
        value = "" if value is None else str(value)
    elif spec.type is bool:
        value = bool(value)
    elif value is None or value == "":
        raise ConfigError(f"{name} is empty", f"enter a value (default {spec.default!r})")
    elif spec.type is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{name}: expected a whole number, got {value:g}", "remove the decimals")
            value = int(value)
        elif isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a whole number, got {value!r}", "enter digits only") from None
    elif spec.type is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}", "enter a number such as 1e-6") from None
    try:
        return coerce(spec.name, spec, value)
    except ConfigError as err:
        raise ConfigError(f"{control.where}{spec.label} ({err.message})", err.hint) from None


def values_to_config(values: list[Any], controls: list[Control], base: TrainConfig) -> TrainConfig:
    """``base`` with every shown setting replaced by the form's values; returns a new config.

    What the form does not show is kept from ``base``: the model's identity and progress, unknown keys, and concepts
    past the panels. Trailing panels left at their defaults are not concepts; an empty panel before a filled one is
    kept, so every concept keeps its index (class image folders are numbered by it). The form's values are those of
    its training method (the tab gives them the method's defaults when it is picked), so ``method_defaults`` is it.
    """
    if len(values) != len(controls):
        raise ValueError(f"{len(values)} values for {len(controls)} controls")
    panels = 1 + max((c.concept for c in controls if c.concept is not None), default=-1)
    settings: dict[str, Any] = {}
    concept_settings: list[dict[str, Any]] = [{} for _ in range(panels)]
    for control, value in zip(controls, values, strict=True):
        converted = _from_control(control, value)
        if control.concept is None:
            settings[control.spec.name] = converted
        else:
            concept_settings[control.concept][control.spec.name] = converted
    shown = [Concept(**values) for values in concept_settings]
    concepts = shown + [dataclasses.replace(c) for c in base.concepts[panels:]]
    while concepts and concepts[-1] == Concept():
        concepts.pop()
    return dataclasses.replace(base, **settings, concepts=concepts, unknown=dict(base.unknown),
                               method_defaults=settings.get("method", base.method_defaults))


# ---------------------------------------------------------------------------------------------------- step count


@dataclass
class StepEstimate:
    total: int
    text: str


def shown_for_method(method: str, controls: list[Control], optimizer: str | None = None,
                     values: Mapping[str, Any] | None = None, prediction: str | None = None) -> list[bool]:
    """Which of ``controls`` apply to the training method, optimizer and the model's prediction type (the rest are
    hidden, e.g. LoRA rank for DreamBooth, Adam's betas for Adafactor, zero terminal SNR for epsilon models);
    ``optimizer`` / ``prediction`` None: any; ``values``: the settings others require (``FieldSpec.requires``: the
    LoKr factor shows for LoRA type lokr), a name not given: any value."""
    return [control.spec.applies(method, optimizer, values, prediction) for control in controls]


def estimate_steps(concepts: list[Concept], epochs: int, batch_size: int, grad_accum: int,
                   concepts_list_file: str = "") -> StepEstimate:
    """Total optimizer steps: per epoch, images x repeats (twice that with prior preservation) in batches of
    ``batch_size``, one optimizer step per ``grad_accum`` batches; times the epochs. Aspect-ratio buckets can add a
    few batches (a bucket's remainder is a batch of its own)."""
    try:
        if concepts_list_file.strip():
            concepts = load_concepts_file(concepts_list_file.strip())
    except UserError as err:
        return StepEstimate(0, f"cannot count steps: {err}")
    from ..data.images import is_image_file  # lazy: it imports torch

    items = 0
    parts = []
    for index, concept in enumerate(concepts):
        folder = concept.instance_data_dir.strip()
        if not folder:
            continue
        path = Path(folder).expanduser()
        images = sum(1 for f in path.iterdir() if is_image_file(f)) if path.is_dir() else 0
        images = max(0, images - concept.validation_holdout)  # held out for validation: they do not train
        per = images * concept.repeats * (2 if concept.num_class_images_per > 0 else 1)
        items += per
        prior = " x 2 (prior preservation)" if concept.num_class_images_per > 0 else ""
        parts.append(f"concept {index + 1}: {images} images x {concept.repeats} repeats{prior}")
    if items == 0:
        return StepEstimate(0, "0 steps: no instance images found yet")
    batch_size, grad_accum, epochs = max(1, int(batch_size)), max(1, int(grad_accum)), max(0, int(epochs))
    per_epoch, total = dataclasses.astuple(count_steps(items, batch_size, grad_accum, epochs))
    text = (f"{total:,} steps = {epochs:,} epochs x {per_epoch:,} steps ({items:,} images per epoch / batch "
            f"{batch_size} / accumulation {grad_accum}); " + "; ".join(parts))
    return StepEstimate(total, text)
