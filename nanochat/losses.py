"""Loss accounting shared by training (val/bpb) and evaluation (``nanochat eval bpb``): bits per byte.

bpb = summed target nats / (ln 2 x summed target UTF-8 bytes), as nanochat computes it: a
tokenizer-independent loss. Targets that are ignored (< 0) or special tokens (0 bytes) count
neither nats nor bytes.
"""

from __future__ import annotations

import math

import torch


def bits_per_byte(total_nats: float, total_bytes: float) -> float:
    """nanochat's bpb: summed target nats over (ln 2 x summed target bytes); +inf without bytes."""
    return total_nats / (math.log(2) * total_bytes) if total_bytes > 0 else float("inf")


def loss_nats_and_bytes(
    per_token_loss: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of nats and of bytes over targets that are real (>= 0) and not special (bytes > 0).

    ``per_token_loss`` and ``targets``: the same number of elements (any shape, e.g. ``(B, T)``);
    ``token_bytes``: ``(vocab,)`` UTF-8 bytes per token id (0 for special tokens). Returns two
    scalars: float32 nats and float64 bytes.
    """
    y = targets.reshape(-1)
    valid = y >= 0
    nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
    counted = nbytes > 0
    nats = (per_token_loss.reshape(-1).float() * counted).sum()
    return nats, nbytes.sum().to(torch.float64)
