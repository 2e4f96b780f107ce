"""The training methods, one file each, behind one small interface (:class:`~.base.TrainingMethod`).

Which methods exist is declared in ``config.METHODS`` (one registration line per method: its name and where its
class lives); :func:`method_class` imports the class when a run asks for it, so the config, the tab and the CLI
know the names without importing torch.

Each method declares its own defaults (:meth:`~.base.TrainingMethod.default_settings`, e.g. its learning rate) over
the config's own, which are DreamBooth's. Choosing a method (the tab's method list, a config with another
``method``, ``train --method``) gives every setting still at the defaults of the method chosen before
(``TrainConfig.method_defaults``) the new method's: :func:`apply_method_defaults`. So a setting the user changed
stays, switching back and forth returns the untouched ones to where they were, and a config from before
per-method defaults (which has no ``method_defaults``: DreamBooth's, the only defaults then) gets its method's.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ...config import METHODS, TrainConfig, field_specs
from ...errors import UserError
from .base import MemoryShare, MethodContext, ParamGroup, SavePoint, TrainingMethod, Weights

__all__ = ["MemoryShare", "MethodContext", "ParamGroup", "SavePoint", "TrainingMethod", "Weights",
           "apply_method_defaults", "method_class", "method_defaults"]


def method_class(name: str) -> type[TrainingMethod]:
    """The class of the training method ``name``: ``config.METHODS[name]`` is ``module:Class``, the module relative to
    this package when it starts with a dot."""
    try:
        where = METHODS[name]
    except KeyError:
        raise UserError(f"unknown training method {name!r}", f"pick one of: {', '.join(METHODS)}") from None
    module_name, _, class_name = where.partition(":")
    module = importlib.import_module(module_name, __package__ if module_name.startswith(".") else None)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)) or cls.name != name:
        raise TypeError(f"config.METHODS[{name!r}] = {where!r} is not a TrainingMethod named {name!r}")
    return cls


def method_defaults(name: str) -> dict[str, Any]:
    """Every setting's default with the training method ``name``: the config's own with the method's over them."""
    own = {s.name: s.default for s in field_specs() if s.default is not dataclasses.MISSING}
    return {**own, **method_class(name).default_settings()}


def apply_method_defaults(cfg: TrainConfig) -> list[str]:
    """Give the settings of ``cfg`` still at the defaults of ``cfg.method_defaults`` (the method chosen before) the
    defaults of ``cfg.method``, in place; a setting with another value is the user's and stays. Returns one line
    per setting changed."""
    old, new = method_defaults(cfg.method_defaults), method_defaults(cfg.method)
    notes = []
    for name, value in new.items():
        if value != old[name] and getattr(cfg, name) == old[name]:
            setattr(cfg, name, value)
            notes.append(f"{name}: {old[name]!r} -> {value!r} (the default of {cfg.method.replace('_', ' ')})")
    cfg.method_defaults = cfg.method
    return notes
