"""The interface between the run (``train/loop.py``, ``train/saving.py``) and a training method.

A method says what trains (its parameter groups and learning rates), how its trained weights go into a resume
state and come back, what a save writes and exports, how a prompt is expanded, and what it adds to the memory
estimate. The run calls these and never asks which method it runs; everything else (data, step, optimizer,
schedule, previews, saving order, crash recovery) is the same for every method.

The order of the calls in a run: ``setup`` (once the models are on the device), ``ready`` (weights in their
training precision, optimizer built), then per step ``expand_prompt`` and ``after_step``; at a save
``trained_weights`` and ``state_dict`` (resume state), ``output_sizes`` (disk check), ``save_outputs`` and, where
``exports_checkpoint``, ``export_checkpoint``; on resume ``load_weights`` and ``load_state_dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...config import TrainConfig
from ...errors import UserError
from ...store import ModelDir
from ..models import Models
from ..options import RunOptions

log = logging.getLogger(__name__)

Weights = dict[str, dict[str, torch.Tensor]]  # resume-state file name -> tensors (CPU copies)


@dataclass
class ParamGroup:
    """Parameters the optimizer trains together, at one learning rate."""

    params: list[torch.nn.Parameter]
    lr: float
    text_encoder: bool = False  # frozen (gradients dropped) once the text encoder's share of the steps is over


@dataclass
class MethodContext:
    """What a method knows of its run."""

    cfg: TrainConfig
    models: Models  # on the training device
    device: torch.device
    model: ModelDir
    options: RunOptions = field(default_factory=RunOptions)


@dataclass(frozen=True)
class SavePoint:
    """Where a save happens: the run's step (resume states count from it), the model's total, the epoch, and the
    prompts trained on (a LoRA's tag frequency: ``TrainingData.tag_prompts``)."""

    step: int
    revision: int
    epoch: int
    captions: Mapping[str, list[str]] = field(default_factory=dict)  # image folder name -> each image's prompt


@dataclass
class MemoryShare:
    """What a method adds to the memory estimate (``profiles.estimate_memory``), in parameters."""

    trained: int  # trained parameters: their gradients, optimizer states and fp32 masters
    added: int = 0  # weights the method adds on the device beside the model's own (a LoRA)
    text_encoders: bool = False  # the text encoders stay on the device (they train, or their output does)
    ema: int = 0  # parameters with an fp32 EMA copy


class TrainingMethod:
    """One training method. Subclasses live one per file in ``train/methods/`` and are registered by one line in
    ``config.METHODS``."""

    name: ClassVar[str] = ""
    #: the text conditioning trains (a new word's vectors): no text-embedding cache, gradients through the encoders
    trains_conditioning: ClassVar[bool] = False
    #: a save also exports a single-file checkpoint (into the host's checkpoint folder, when exports are on)
    exports_checkpoint: bool = False
    #: what trains lives beside the model (an adapter, a word, a hypernetwork) and the working weights stay the
    #: base's: previews of a saved run ("Generate samples now") put the last save's weights back (:meth:`restore`)
    trains_beside_model: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.models = ctx.models
        self.device = ctx.device
        self.model = ctx.model
        self.options = ctx.options

    # ------------------------------------------------------------------------------------------------ settings
    @classmethod
    def default_settings(cls) -> dict[str, Any]:
        """This method's defaults where they are not the config's own (field name -> value; the config's own are
        DreamBooth's): choosing the method gives them to every setting the user has not changed
        (``methods.apply_method_defaults``)."""
        return {}

    @classmethod
    def memory(cls, cfg: TrainConfig, counts: Mapping[str, Any]) -> MemoryShare:
        """This method's share of the memory estimate; ``counts``: the family's parameter counts
        (``profiles.PARAMS``)."""
        return MemoryShare(trained=0)

    @classmethod
    def check_prompts(cls, cfg: TrainConfig, prompts: list[str]) -> list[str]:
        """Refuse (UserError) training prompts this method cannot learn from, before the run (``preflight.py``);
        ``prompts``: every instance image's. Returns notes on what is allowed but probably not meant."""
        return []

    def memory_tips(self) -> list[str]:
        """Advice after an out-of-memory error that only this method can take (e.g. another method)."""
        return []

    # ------------------------------------------------------------------------------------------------ what trains
    def text_encoder_steps(self, planned: int) -> int:
        """The steps the text encoders train (``planned`` from the config's ratio; 0 where they never do)."""
        return planned

    def setup(self, text_encoder_steps: int) -> list[ParamGroup]:
        """Make what trains (attach adapters, freeze the rest, set train/eval modes); return the non-empty
        parameter groups with their learning rates, in a fixed order (a resume state's optimizer follows it)."""
        raise NotImplementedError

    def ready(self) -> None:
        """The weights are in their training precision and the optimizer exists (e.g. an EMA starts from them)."""
        if self.cfg.use_ema:
            log.warning("EMA applies to full DreamBooth training of the UNet; it is off for this run")

    def added_modules(self) -> list[torch.nn.Module]:
        """Modules beside the model's own that move with the weight precision (a LoRA network)."""
        return []

    def expand_prompt(self, prompt: str) -> str:
        """A prompt as the text encoders must see it (training, text cache, previews)."""
        return prompt

    def after_step(self) -> None:
        """After each optimizer step."""

    # ------------------------------------------------------------------------------------------------ weights
    def trained_weights(self) -> Weights:
        """CPU copies of what trains, for the resume state and the save's files (called in full precision)."""
        raise NotImplementedError

    def load_weights(self, weights: Weights) -> None:
        """Put a resume state's weights (:meth:`trained_weights`) back."""
        raise NotImplementedError

    def restore(self, weights: Weights) -> None:
        """Outside a run (previews of a saved one): make what trains as :meth:`setup` does and put a resume state's
        weights (:meth:`trained_weights`) in. A method whose text encoders may train or not says which from them."""
        self.setup(0)
        self.load_weights(weights)

    def state_dict(self) -> dict[str, Any]:
        """Trainer state beside the weights for the resume state (an EMA)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`, given the whole trainer state."""

    def output_sizes(self, weights: Weights) -> dict[Path, int]:
        """Bytes :meth:`save_outputs` writes, per folder (for the disk check before a save)."""
        raise NotImplementedError

    def save_outputs(self, weights: Weights, at: SavePoint) -> list[Path]:
        """Write this save's files besides the resume state (working weights or the method's own files), each
        atomically; return the files exported into the host's folders."""
        raise NotImplementedError

    def export_checkpoint(self, dest: Path) -> Path:
        """Write the single-file checkpoint of this save to ``dest`` (only where :attr:`exports_checkpoint`)."""
        raise NotImplementedError(f"{self.name} exports no checkpoint")

    # ------------------------------------------------------------------------------------------------ helpers
    def export_folder(self, folder: Path | None) -> Path | None:
        """``folder`` (one of the host's) when a save exports there, else None."""
        return folder if self.cfg.save_checkpoint else None

    def check_something_trains(self, train_text_encoder: bool) -> None:
        if not self.cfg.train_unet and not train_text_encoder:
            raise UserError("nothing to train: the UNet is off and the text encoder step ratio is 0",
                            "turn 'Train UNet' on or set a text encoder step ratio above 0")


def cpu_copies(state: Mapping[str, torch.Tensor], clone: bool = False) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors (``clone``: also when they are on the CPU already)."""
    return {k: (v.detach().cpu().clone() if clone else v.detach().cpu()) for k, v in state.items()}


def tensor_bytes(obj: object) -> int:
    """The bytes of every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def add_size(sizes: dict[Path, int], folder: Path | None, size: int) -> None:
    if folder is not None:
        sizes[folder] = sizes.get(folder, 0) + size
