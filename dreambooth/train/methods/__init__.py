"""The training methods, one file each, behind one small interface (:class:`~.base.TrainingMethod`).

Which methods exist is declared in ``config.METHODS`` (one registration line per method: its name and where its
class lives); :func:`method_class` imports the class when a run asks for it, so the config, the tab and the CLI
know the names without importing torch.
"""

from __future__ import annotations

import importlib

from ...config import METHODS
from ...errors import UserError
from .base import MemoryShare, MethodContext, ParamGroup, SavePoint, TrainingMethod, Weights

__all__ = ["MemoryShare", "MethodContext", "ParamGroup", "SavePoint", "TrainingMethod", "Weights", "method_class"]


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
