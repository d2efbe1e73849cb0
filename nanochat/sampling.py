"""Choosing the next token from a row of logits: greedy, temperature, top-k, top-p.

Used by :mod:`nanochat.engine` for every sampled token, all rows of a decode step at once
(:func:`sample_rows`). Every value ``SamplingParams`` admits
(finite temperature >= 0, 0 < top_p <= 1, top_k >= 1) samples without numerical errors, and
logits with NaN/inf (a broken model) give a clear :class:`SamplingError` instead of a crash
deep inside ``torch.multinomial``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanochat.common import NanochatError

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (argmax, ``seed`` ignored), like vLLM's ``_SAMPLING_EPS``.

Sampling itself is safe at any positive temperature (logits are shifted by their max before the
division, see :func:`sample_rows`), so this is not a guard against overflow but a definition: at
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

    One row of :func:`sample_rows`; raises :class:`SamplingError` when no logit is usable.
    """
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    tokens, bad = sample_rows(logits[None], [temperature], [top_k], [top_p], [generator])
    if bad[0]:
        raise SamplingError(NO_USABLE_LOGITS)
    return tokens[0]


NO_USABLE_LOGITS = "the model produced no usable logits (all NaN or -inf) for this sequence"


def sample_rows(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int | None],
    top_p: Sequence[float | None],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int], list[bool]]:
    """Sample one id per row of ``logits`` (R, vocab), each row with its own settings, in one pass.

    Every row must have ``temperature >= GREEDY_BELOW`` (greedy rows take the argmax instead).
    Returns ``(ids, bad)``: ``bad[r]`` is True when row r has no usable logit (all NaN or -inf;
    its id is meaningless) so the caller fails that row alone.

    Safe for every admitted value: the logits are shifted so their max is 0 *before* dividing by
    the temperature (the values stay <= 0, so a tiny temperature gives -inf, never inf - inf =
    NaN), NaN logits never win, and +inf logits share the probability mass. The draw is one
    uniform number per row from that row's ``generator`` (the global generator when None) by
    inverse CDF over the filtered distribution, so a seeded row draws the same alone or in any
    batch.
    """
    x = logits.float()
    rows, vocab = x.shape
    dev = x.device
    top = x.amax(dim=1, keepdim=True)
    bad = torch.zeros(rows, dtype=torch.bool, device=dev)
    if not bool(torch.isfinite(top).all()):  # a NaN or +inf logit, or a row with no finite one
        x, bad = _usable(x)
        top = x.amax(dim=1, keepdim=True)
    x = (x - top) / torch.tensor(temperature, dtype=torch.float32, device=dev)[:, None]
    u = torch.cat([torch.rand(1, generator=g, device=dev) for g in generators])  # in row order
    ks = [k if k is not None and k < vocab else vocab for k in top_k]
    ps = [p if p is not None and p < 1.0 else float("inf") for p in top_p]  # inf: keep all, whatever rounding
    ids = [0] * rows
    plain = [r for r in range(rows) if ks[r] == vocab and ps[r] == float("inf")]
    if plain:
        some = len(plain) < rows
        for r, token in zip(plain, _draw(torch.exp(x[plain] if some else x), None, u[plain] if some else u)):
            ids[r] = token
    filtered = [r for r in range(rows) if ks[r] < vocab or ps[r] < 1.0]
    if filtered:
        for r, token in zip(filtered, _draw_filtered(x[filtered], [ks[r] for r in filtered],
                                                      [ps[r] for r in filtered], u[filtered])):
            ids[r] = token
    return ids, bad.tolist()


def _draw_filtered(x: torch.Tensor, ks: list[int], ps: list[float], u: torch.Tensor) -> list[int]:
    """Top-k then top-p (nucleus over the top-k survivors) per row, in descending order; then the draw
    over the survivors in id order. Weights are ``exp(x)`` (``x <= 0``) and sums are prefix sums, so
    entries masked to 0 do not change any sum: a row's result does not depend on ``width``."""
    vocab = x.shape[1]
    width = max(ks)
    vals, ids = torch.topk(x, width, dim=1) if width < vocab else torch.sort(x, dim=1, descending=True)
    w = torch.exp(vals)
    if min(ks) < width:
        w = w.masked_fill(torch.arange(width, device=x.device)[None, :] >= torch.tensor(ks, device=x.device)[:, None], 0.0)
    if min(ps) < 1.0:  # keep a token while the mass strictly before it is below p (the top token always stays)
        c = torch.cumsum(w, dim=1)
        p = torch.tensor(ps, dtype=torch.float32, device=x.device)[:, None]
        w = w.masked_fill((c - w) >= p * c[:, -1:], 0.0)
    if width < vocab:
        order = ids.argsort(dim=1)
        return _draw(w.gather(1, order), ids.gather(1, order), u)
    return _draw(torch.zeros_like(w).scatter_(1, ids, w), None, u)


def _draw(weights: torch.Tensor, ids: torch.Tensor | None, u: torch.Tensor) -> list[int]:
    """Inverse CDF: per row the first column whose prefix sum of ``weights`` exceeds ``u`` times the
    row's total (``ids`` maps columns to token ids; None: the column is the id). Columns in id order,
    so a row's draw depends only on its own weights and ``u``."""
    cdf = torch.cumsum(weights, dim=1)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    if ids is not None:
        choice = ids.gather(1, choice)
    return choice[:, 0].tolist()


def _usable(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: NaN → -inf; if any are +inf, only those remain (equally likely). Rows left with no
    finite value are flagged (second result) and zeroed so they cannot spread NaN."""
    ninf = torch.full_like(x, float("-inf"))
    posinf = torch.isposinf(x)
    x = torch.where(torch.isnan(x), ninf, x)
    x = torch.where(posinf.any(dim=1, keepdim=True), torch.where(posinf, torch.zeros_like(x), ninf), x)
    bad = ~torch.isfinite(x).any(dim=1)
    return x.masked_fill(bad[:, None], 0.0), bad
