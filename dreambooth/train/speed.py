"""``torch.compile`` of the UNet.

``compile_unet``: the UNet's forward is wrapped with ``torch.compile`` for the training steps (with gradients on);
previews (no gradients, other shapes) use the plain forward so they cause no recompiles. Compiling is lazy: if it
fails at the first step (no compiler, an unsupported platform or op), the run says so once and continues with
the plain forward.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_unet(unet: torch.nn.Module) -> str | None:
    """Wrap ``unet.forward`` with torch.compile (training steps only). Returns a note for the user, or None."""
    compiler = getattr(torch, "compile", None)
    if compiler is None:
        note = "torch.compile is not available in this torch version: training with the plain UNet"
        log.warning("%s", note)
        return note
    plain = unet.forward
    try:
        compiled = compiler(plain)
    except Exception as err:  # noqa: BLE001 - any failure means "train without compiling"
        note = f"torch.compile failed ({type(err).__name__}: {err}): training with the plain UNet"
        log.warning("%s", note)
        return note
    state = {"ok": True}

    @functools.wraps(plain)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not (state["ok"] and torch.is_grad_enabled()):
            return plain(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - compile errors come from many layers (dynamo, inductor, C++)
            state["ok"] = False
            log.warning("torch.compile of the UNet failed (%s: %s); training continues with the plain UNet",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return plain(*args, **kwargs)

    unet.forward = forward
    unet._dreambooth_compiled = state  # tests and the status read whether compiling still works
    log.info("UNet forward compiled with torch.compile (the first step compiles and is slow)")
    return None
