"""bf16 weights: the ``weight_precision`` setting.

* ``fp32``: nothing changes; the weights stay in 32 bits.
* ``bf16_master``: every module (UNet, VAE, text encoders, LoRA) is stored in bf16; each *trained* parameter has
  an fp32 master copy that the optimizer updates, copied back (rounded to nearest) into the bf16 weight after each
  update. Same optimizer math as fp32; saves activation and frozen-model memory, not trainable-weight memory.
* ``bf16_stochastic``: everything in bf16 and no fp32 copy of anything. Each update is computed in fp32 for one
  parameter at a time (a transient copy) and written back with :func:`stochastic_round`: bf16 = the fp32 value
  plus random bits in the 16 mantissa bits bf16 drops, then truncated. The rounding is unbiased on average, so
  updates smaller than a bf16 step still move the weight in expectation. The random bits come from a generator
  seeded from (seed, step, parameter index), so a resumed run repeats an uninterrupted one exactly.

Saving: :meth:`WeightPrecision.full_precision` points each trained weight at its fp32 value for a ``with`` block
(the master in bf16_master mode, an exact fp32 upcast in bf16_stochastic mode), so saved resume states and working
weights stay fp32 files and exports use the export settings' dtype as before; loading a resume state goes through
the same block, filling the masters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from ..config import WEIGHT_PRECISIONS
from ..errors import UserError

log = logging.getLogger(__name__)


def check_weight_precision(mode: str, mixed_precision: str, device: torch.device) -> None:
    """Refuse bf16 weights where they cannot work, naming the setting to change."""
    if mode not in WEIGHT_PRECISIONS:
        raise UserError(f"unknown weight precision {mode!r}", f"pick one of: {', '.join(WEIGHT_PRECISIONS)}")
    if mode == "fp32":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"weight precision {mode} needs a GPU with bf16 support and this one has none",
                        "set weight precision to fp32")
    if mixed_precision != "bf16":
        raise UserError(f"weight precision {mode} stores the weights in bf16, which needs bf16 mixed precision "
                        f"(now {mixed_precision})", "set mixed precision to bf16, or weight precision to fp32")


def stochastic_round(value: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``value`` (fp32) rounded to bf16 stochastically: add uniform random bits below bf16's mantissa, truncate.

    The result is one of the two bf16 neighbours of each value, the upper one with probability equal to the
    distance from the lower one over the gap, so ``E[stochastic_round(x)] == x``. Deterministic given the
    generator's state (the random bits are drawn on the generator's device, which must be ``value``'s).
    """
    copy = value.detach().to(torch.float32, copy=True)  # a dense layout (channels-last) stays as it is
    flat = torch.empty(padded_size(copy.numel()), dtype=torch.float32, device=copy.device)
    flat[:copy.numel()] = in_memory_order(copy)
    noise = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
    draw_noise(noise, generator)
    _round_in_place(flat, noise)
    in_memory_order(copy).copy_(flat[:copy.numel()])
    return copy.to(torch.bfloat16)


def padded_size(numel: int) -> int:
    """A parameter's room in a flat buffer of noise: even (the random bits come in pairs)."""
    return numel + (numel & 1)


def draw_noise(out: torch.Tensor, generator: torch.Generator | None) -> None:
    """Fill ``out`` (int32, even length) with uniform 16-bit values [0, 65536): one 31-bit draw per pair of
    elements, its bits 0-15 for the first and 15-30 for the second (one bit shared: a correlation of 2e-5 between
    neighbours, none in each one's rounding). Half the draws of one per element, which are the rounding's largest
    cost on a CPU."""
    draws = torch.empty(out.numel() // 2, dtype=torch.int32, device=out.device).random_(generator=generator)
    _split_draws(draws, out)


def _int32(value: int) -> torch.Tensor:
    """A 0-dim int32 tensor (the integer ops' constants: torch 2.1 under a dispatch mode, as the benchmark's memory
    tracker, cannot take a Python int for them)."""
    return torch.tensor(value, dtype=torch.int32)


def _split_draws(draws: torch.Tensor, out: torch.Tensor) -> None:
    pairs = out.view(-1, 2)
    torch.bitwise_and(draws, _int32(0xFFFF), out=pairs[:, 0])
    torch.bitwise_right_shift(draws, _int32(15), out=pairs[:, 1])  # bit 31 of a draw is 0: 16 bits already


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory with no gaps: contiguous in the standard or channels-last order."""
    return t.is_contiguous() or t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of the dense ``t`` as a flat view, in the order they lie in memory (the order random bits are
    drawn in, so a parameter's rounding does not depend on how it is copied)."""
    return t.as_strided((t.numel(),), (1,))


def _round_in_place(value: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``value`` (contiguous fp32) becomes exactly bf16-representable: plus ``noise`` (16 random bits per element)
    below bf16's mantissa, then the low 16 bits cleared. Two in-place passes. A carry out of the mantissa is the
    round-up it stands for (up to inf above bf16's largest value); inf has zero low bits and stays inf."""
    bits = value.view(torch.int32)
    bits.add_(noise)
    bits.bitwise_and_(_int32(-65536))  # keep sign, exponent and the 7 bf16 mantissa bits
    return value


@torch.no_grad()
def stochastic_write_back(params: list[torch.Tensor], flat: torch.Tensor, seeds: list[int],
                          scratch: torch.Tensor | None = None) -> None:
    """Each bf16 ``params[i]`` gets its fp32 value, stochastically rounded with the random stream seeded
    ``seeds[i]``: the same bits as :func:`stochastic_round` of it with that seed's generator, with one pass of
    arithmetic over the whole group instead of a few per parameter. ``flat`` holds the values side by side, each
    in the parameter's memory order, in a room of :func:`padded_size`. ``scratch``: int32 room for 1.5 x ``flat``'s
    elements to reuse (fresh memory costs page faults on a CPU), else allocated here."""
    if scratch is None:
        scratch = torch.empty(flat.numel() * 3 // 2, dtype=torch.int32, device=flat.device)
    noise, draws = scratch[:flat.numel()], scratch[flat.numel():flat.numel() * 3 // 2]
    generator = torch.Generator(device=flat.device)
    offset = 0
    for p, seed in zip(params, seeds, strict=True):
        generator.manual_seed(seed)  # each parameter's own stream
        room = padded_size(p.numel()) // 2
        draws[offset:offset + room].random_(generator=generator)
        offset += room
    _split_draws(draws, noise)
    _round_in_place(flat, noise)
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].as_strided(p.shape, p.stride()))  # exact: a bf16 value now
        offset += padded_size(p.numel())


def round_seed(seed: int, step: int, index: int) -> int:
    """The seed of parameter ``index``'s stochastic rounding at optimizer step ``step``."""
    return ((seed * 1_000_003 + step) * 65_537 + index) % 2**63


def round_generator(seed: int, step: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of parameter ``index``'s stochastic rounding at optimizer step ``step``, on ``device``."""
    return torch.Generator(device=device).manual_seed(round_seed(seed, step, index))


class WeightPrecision:
    """Holds the masters (bf16_master) and does the casts; one per run."""

    def __init__(self, mode: str, seed: int) -> None:
        self.mode = mode
        self.seed = seed
        self.masters: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.trained: list[torch.nn.Parameter] = []
        self.step = 0  # the optimizer step the next rounding belongs to (set by the trainer)

    @property
    def bf16(self) -> bool:
        return self.mode != "fp32"

    def cast_modules(self, modules: Iterable[torch.nn.Module], trained: list[torch.nn.Parameter]) -> None:
        """Store ``modules`` in bf16; in bf16_master mode keep an fp32 master of each ``trained`` parameter first."""
        if not self.bf16:
            return
        self.trained = list(trained)
        if self.mode == "bf16_master":
            self.masters = {p: p.detach().float().clone() for p in self.trained}
        for module in modules:
            module.to(torch.bfloat16)
        log.info("weights stored in bf16 (%s)", self.mode)

    def value(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor the optimizer updates for ``param``: its master, else the parameter itself."""
        return self.masters.get(param, param)

    @torch.no_grad()
    def write_back(self, param: torch.nn.Parameter, updated: torch.Tensor, index: int) -> None:
        """Put the fp32 ``updated`` value into the bf16 ``param``: nearest (master mode) or stochastic rounding."""
        if self.mode == "bf16_master":
            param.copy_(updated)
        else:
            param.copy_(stochastic_round(updated, self.generator(index, param.device)))

    def generator(self, index: int, device: torch.device) -> torch.Generator:
        """The random stream of parameter ``index``'s stochastic rounding at this step."""
        return round_generator(self.seed, self.step, index, device)

    def round_seed(self, index: int) -> int:
        return round_seed(self.seed, self.step, index)

    @contextmanager
    def full_precision(self, params: Iterable[torch.nn.Parameter] | None = None) -> Iterator[None]:
        """Within the block each trained parameter *is* its fp32 value (for saving and loading weights)."""
        if not self.bf16:
            yield
            return
        params = list(self.trained if params is None else params)
        with torch.no_grad():
            for p in params:
                p.data = self.masters[p] if p in self.masters else p.data.float()
        try:
            yield
        finally:
            with torch.no_grad():
                for p in params:
                    p.data = p.data.to(torch.bfloat16)  # exact for stochastic mode (its values are bf16 values)
