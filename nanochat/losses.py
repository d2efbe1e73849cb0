"""Loss accounting shared by training (val/bpb) and evaluation (``nanochat eval bpb``): bits per byte.

bpb = summed target nats / (ln 2 x summed target UTF-8 bytes), as nanochat computes it: a
tokenizer-independent loss. Targets that are ignored (< 0) or special tokens (0 bytes) count
neither nats nor bytes.

Also the head's loss, nanochat's cross-entropy over fp32 softcapped logits: the reference formula
(evaluation, inference) and a fused autograd op with the same values for training
(:func:`softcap_cross_entropy`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def softcap_cross_entropy_reference(
    logits: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str = "mean"
) -> torch.Tensor:
    """nanochat's head loss as written there: ``F.cross_entropy(cap·tanh(logits.float()/cap), targets)``.

    ``logits``: ``(..., V)`` any float dtype; ``targets``: ``(...)`` int64, -1 ignored. Returns a
    scalar (``mean``: over non-ignored targets, NaN when there are none; ``sum``) or ``(N,)`` per-token
    losses (``none``, 0 where ignored), float32.
    """
    z = cap * torch.tanh(logits.float() / cap)
    return F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction)


_MAX_CAP = 60.0  # exp(60) · 2^40 columns < fp32's max (3.4e38)


def _softcap_tanh(logits: torch.Tensor, two_over_cap: float) -> torch.Tensor:
    """tanh(logits / cap) in fp32 as 1 - 2 / (exp(2·logits/cap) + 1): within 2e-7 of torch.tanh (absolute),
    and ~2x cheaper per element than inductor's CPU tanh (Sleef), the larger part of this loss's cost."""
    return 1.0 - 2.0 / (torch.exp(logits.float() * two_over_cap) + 1.0)


class _SoftcapCrossEntropy(torch.autograd.Function):
    """Forward saves the logits as given (bf16 under autocast) and each row's log-sum-exp; backward
    recomputes the softcap and the softmax from them in one pass. No fp32 ``(N, V)`` tensor is kept."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str) -> torch.Tensor:
        valid = targets != -1
        target32 = torch.where(valid, targets, 0).to(torch.int32)  # int32: a cheaper compare in backward
        z = cap * _softcap_tanh(logits, 2.0 / cap)
        # |z| <= cap <= _MAX_CAP: exp(z) summed over any vocab stays finite in fp32, so no pass for the row max
        lse = z.exp().sum(-1).log()
        # the target's logit softcapped on its own: z is only summed, so it is never stored
        picked = cap * _softcap_tanh(logits.gather(1, target32[:, None].long()).squeeze(1), 2.0 / cap)
        per_token = torch.where(valid, lse - picked, 0.0)
        ctx.save_for_backward(logits, target32, valid, lse)
        ctx.cap, ctx.reduction = cap, reduction
        if reduction == "none":
            return per_token
        return per_token.sum() / valid.sum() if reduction == "mean" else per_token.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, target32, valid, lse = ctx.saved_tensors
        if ctx.reduction == "none":
            row_scale = torch.where(valid, grad_out, 0.0)
        else:
            row_scale = valid * (grad_out / valid.sum() if ctx.reduction == "mean" else grad_out)
        t = _softcap_tanh(logits, 2.0 / ctx.cap)
        p = torch.exp(ctx.cap * t - lse[:, None])
        cols = torch.arange(logits.size(1), device=logits.device, dtype=torch.int32)
        p = torch.where(cols[None, :] == target32[:, None], p - 1.0, p)  # softmax - one_hot(target)
        grad = p * (1.0 - t * t) * row_scale[:, None]  # d(cap·tanh(x/cap))/dx = 1 - tanh²
        return grad.to(logits.dtype), None, None, None


def softcap_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str = "mean"
) -> torch.Tensor:
    """:func:`softcap_cross_entropy_reference` for training: per-token losses within 1e-5 (absolute) of it,
    the logits' gradient within fp32 rounding (bf16 logits: the same bf16 values but for an ulp here and there).

    One op whose backward recomputes ``cap·tanh(logits/cap)`` and the softmax from the saved
    ``logits`` (bf16 under autocast) and a per-row log-sum-exp: autograd keeps no fp32 ``(N, V)``
    tensor, and under ``torch.compile`` forward and backward are one fused loop each over the logits.
    ``logits``: ``(..., V)``; ``targets``: ``(...)`` int64, -1 ignored; ``cap``: the softcap (a cap
    outside (0, :data:`_MAX_CAP`] takes the reference). Returns as the reference does (float32 scalar
    for ``mean``/``sum``, ``(N,)`` for ``none``); ``logits``' gradient has ``logits``' dtype.

    Raises:
        ValueError: ``reduction`` is not ``mean``, ``sum`` or ``none``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")
    if not 0.0 < cap <= _MAX_CAP:
        return softcap_cross_entropy_reference(logits, targets, cap, reduction)
    return _SoftcapCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), cap, reduction)
