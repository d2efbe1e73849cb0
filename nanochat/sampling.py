"""Choosing the next token from a row of logits: greedy, temperature, top-k, top-p.

Used by :mod:`nanochat.engine` for every sampled token. Every value ``SamplingParams`` admits
(finite temperature >= 0, 0 < top_p <= 1, top_k >= 1) samples without numerical errors, and
logits with NaN/inf (a broken model) give a clear :class:`SamplingError` instead of a crash
deep inside ``torch.multinomial``.
"""

from __future__ import annotations

import torch

from nanochat.common import NanochatError

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (argmax, ``seed`` ignored), like vLLM's ``_SAMPLING_EPS``.

Sampling itself is safe at any positive temperature (logits are shifted by their max before the
division, see :func:`sample_token`), so this is not a guard against overflow but a definition: at
T = 1e-5 a token 1e-3 below the top logit already has weight exp(-100) ≈ 4e-44, under fp32's
smallest normal, i.e. the draw is the argmax except among logits closer than matmul noise.
"""


class SamplingError(NanochatError):
    """No token can be drawn from these logits (all NaN or -inf)."""


def seed_for(seed: int, index: int) -> int:
    """Seed of sample ``index``: the request seed itself for sample 0, distinct ones after."""
    return seed if index == 0 else (seed * 1_000_003 + index * 0x9E3779B97F4A7C15) % (1 << 63)


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one id from ``logits`` (vocab,): argmax below :data:`GREEDY_BELOW`, else sample.

    Safe for every admitted value: the logits are shifted so their max is 0 *before* dividing by
    the temperature (the values stay <= 0, so a tiny temperature gives -inf, never inf - inf =
    NaN), NaN logits never win, and +inf logits share the probability mass. Raises
    :class:`SamplingError` when no logit is usable (all NaN or -inf).
    """
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    logits = _usable(logits.float())
    logits = (logits - logits.max()) / temperature
    ids = None
    if top_k is not None and top_k < logits.numel():
        logits, ids = torch.topk(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits, order = torch.sort(logits, descending=True)
        ids = order if ids is None else ids[order]
        probs = torch.softmax(logits, dim=-1)
        keep = (torch.cumsum(probs, dim=-1) - probs) < top_p  # the top token is always kept
        logits = logits.masked_fill(~keep, float("-inf"))
    choice = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
    return int(ids[choice]) if ids is not None else choice


def _usable(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with NaN → -inf; if any are +inf, only those remain (equally likely)."""
    if bool(torch.isfinite(logits).all()):
        return logits
    ninf = torch.full_like(logits, float("-inf"))
    posinf = torch.isposinf(logits)
    if bool(posinf.any()):
        return torch.where(posinf, torch.zeros_like(logits), ninf)
    logits = torch.where(torch.isnan(logits), ninf, logits)
    if not bool(torch.isfinite(logits).any()):
        raise SamplingError("the model produced no usable logits (all NaN or -inf) for this sequence")
    return logits
