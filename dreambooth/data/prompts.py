"""Tokenizing training prompts for CLIP, whose text encoder sees 77 tokens (bos + 75 + eos) at a time.

Two ways to handle longer prompts, chosen by the ``long_prompts`` setting:

* ``truncate``: keep the first 75 tokens and report what was dropped, so a user knows the end of a caption is
  not trained on;
* ``chunk``: the WebUI's way: cut the tokens into windows of 75, wrap each as its own 77-token sequence, run the
  text encoder once per window and concatenate the hidden states. Training on prompts as the WebUI will later
  read them keeps long captions meaningful.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import LONG_PROMPTS

WINDOW = 75  # tokens per text-encoder pass, without bos and eos
SEQUENCE = WINDOW + 2


def _short(prompt: str, limit: int = 60) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3].rstrip() + "..."


def _wrap(ids: list[int], bos: int, eos: int, pad: int) -> list[int]:
    """bos + ids + eos, padded to 77."""
    return [bos, *ids, eos] + [pad] * (WINDOW - len(ids))


def tokenize_prompts(tokenizer: Any, prompts: list[str], mode: str) -> tuple[torch.Tensor, list[str]]:
    """Input ids ``[B, 77 * n]`` for ``prompts`` and warnings about dropped tokens.

    ``truncate`` gives n = 1. ``chunk`` gives n = the most 75-token windows any prompt needs; shorter prompts get
    windows of just bos + eos + padding, so row i's window k is ``ids[i, 77*k : 77*(k+1)]``.
    """
    if mode not in LONG_PROMPTS:
        raise ValueError(f"mode must be one of {', '.join(LONG_PROMPTS)}, got {mode!r}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # verbose=False: the tokenizer's own "longer than 77" warning is replaced by ours (or not needed when chunking)
    tokens = [list(tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids) for prompt in prompts]
    warnings: list[str] = []
    if mode == "truncate":
        rows = []
        for prompt, ids in zip(prompts, tokens, strict=True):
            if len(ids) > WINDOW:
                dropped = len(ids) - WINDOW
                warnings.append(f"prompt '{_short(prompt)}' has {len(ids)} tokens; the last {dropped} beyond "
                                f"{WINDOW} were dropped (set long prompts to 'chunk' to keep them)")
                ids = ids[:WINDOW]
            rows.append(_wrap(ids, bos, eos, pad))
        return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), SEQUENCE), warnings
    windows = [[ids[i:i + WINDOW] for i in range(0, len(ids), WINDOW)] or [[]] for ids in tokens]
    count = max((len(w) for w in windows), default=1)
    rows = []
    for wins in windows:
        wins = wins + [[]] * (count - len(wins))
        rows.append([token for win in wins for token in _wrap(win, bos, eos, pad)])
    return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), SEQUENCE * count), warnings
