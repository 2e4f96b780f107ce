"""Text conditioning: token ids -> the UNet's encoder hidden states (and SDXL's pooled embedding and time ids).

Clip skip follows the WebUI: ``clip_skip`` N takes the output of the N-th last layer and applies the encoder's
final layer norm to it (N = 1 is the usual last_hidden_state). SDXL conditions on the penultimate layer of both encoders
(that is its clip skip 1) and on the pooled, projected output of the second. Long prompts come in as several
77-token windows (see ``data.prompts``); each window is encoded on its own and the results are concatenated along
the sequence, as the WebUI does.
"""

from __future__ import annotations

import torch

from .models import Models

WINDOW = 77


def _hidden(encoder: torch.nn.Module, ids: torch.Tensor, layer_from_end: int, final_norm: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states of one window from the ``layer_from_end``-th last layer (1 = last), and the pooled output."""
    out = encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-layer_from_end]
    if final_norm:  # last_hidden_state is the last layer plus this norm; skipped layers get it too
        text_model = getattr(encoder, "text_model", encoder)
        hidden = text_model.final_layer_norm(hidden)
    pooled = getattr(out, "text_embeds", None)
    return hidden, pooled


def encode_tokens(models: Models, token_ids: list[torch.Tensor], clip_skip: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``token_ids``: one [B, 77*n] tensor per tokenizer. Returns (hidden [B, 77*n, D], pooled [B, P] or None)."""
    per_encoder = []
    pooled = None
    for index, (encoder, ids) in enumerate(zip(models.text_encoders, token_ids, strict=True)):
        ids = ids.to(next(encoder.parameters()).device)
        windows = ids.split(WINDOW, dim=1)
        if models.is_sdxl:  # SDXL: penultimate layer, no final norm; clip skip counts from there
            parts = [_hidden(encoder, w, clip_skip + 1, final_norm=False) for w in windows]
        else:
            parts = [_hidden(encoder, w, clip_skip, final_norm=True) for w in windows]
        per_encoder.append(torch.cat([h for h, _ in parts], dim=1))
        if index == 1:
            pooled = parts[0][1]
    return torch.cat(per_encoder, dim=-1), pooled


def sdxl_time_ids(sizes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's micro-conditioning per example: original size, crop top-left, target size (all as (h, w))."""
    rows = [[h, w, 0, 0, h, w] for w, h in sizes]
    return torch.tensor(rows, device=device, dtype=dtype)
