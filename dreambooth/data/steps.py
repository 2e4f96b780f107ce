"""The one count of a run's optimizer steps: the trainer's, the tab's estimate and the kohya import's formula."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCount:
    per_epoch: int
    total: int


def count_steps(items: int, batch_size: int, accumulation: int, epochs: int, *, batches: int | None = None
                ) -> StepCount:
    """Optimizer steps of a run: each epoch's ``items`` (images x repeats, twice that with prior preservation) in
    batches of ``batch_size``, one optimizer step per ``accumulation`` batches (a short last batch and a short last
    accumulation still make a step), times ``epochs``.

    ``batches``: the epoch's real number of batches when aspect-ratio buckets cut it into more (each bucket's
    remainder is a batch of its own); by default ``ceil(items / batch_size)``, exact for one bucket.
    """
    if items < 0 or batch_size < 1 or accumulation < 1 or epochs < 0:
        raise ValueError(f"need items >= 0, batch size >= 1, accumulation >= 1, epochs >= 0; got {items}, "
                         f"{batch_size}, {accumulation}, {epochs}")
    if batches is None:
        batches = math.ceil(items / batch_size)
    per_epoch = math.ceil(batches / accumulation)
    return StepCount(per_epoch, per_epoch * epochs)
