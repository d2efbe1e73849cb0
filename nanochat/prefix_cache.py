"""Reuse the KV of recent prompts that share a token prefix with a new one.

A multi-turn chat re-sends its whole history every turn, so the keys/values of that history were
already computed for the previous turn. The engine stores the KV of finished prompts (and of
finished conversations) here; a new prompt copies the KV of its longest cached prefix and only
prefills the rest. Bounded by total cached tokens (least recently used go first) and by age.
Tensors are opaque here: this module knows nothing of the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Entry:
    tokens: np.ndarray
    k: torch.Tensor  # (n_layer, len, n_kv_head, head_dim)
    v: torch.Tensor
    created: float
    last_used: float = field(default=0.0)


class PrefixCache:
    """Longest-prefix lookup over stored (tokens, K, V) entries with LRU-by-size and TTL eviction."""

    def __init__(
        self,
        max_tokens: int = 16384,
        ttl_s: float = 600.0,
        min_tokens: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_tokens, self.ttl_s, self.min_tokens = max_tokens, ttl_s, min_tokens
        self._clock = clock
        self._entries: list[_Entry] = []
        self.hits = self.misses = self.tokens_reused = 0

    def lookup(self, tokens: Sequence[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``(n, k, v)``: the first ``n`` tokens' KV (``n`` < len(tokens), so one token is left to run)."""
        self._expire()
        query = np.asarray(tokens, dtype=np.int64)
        best, best_n = None, 0
        for entry in self._entries:
            n = _common_prefix(entry.tokens, query)
            if n > best_n:
                best, best_n = entry, n
        best_n = min(best_n, len(query) - 1)
        if best is None or best_n < self.min_tokens:
            self.misses += 1
            return 0, None, None
        best.last_used = self._clock()
        self.hits += 1
        self.tokens_reused += best_n
        return best_n, best.k[:, :best_n], best.v[:, :best_n]

    def insert(self, tokens: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a copy of ``k``/``v`` (``(n_layer, len(tokens), ...)``) for ``tokens``."""
        n = len(tokens)
        if n < self.min_tokens or n > self.max_tokens:
            return
        self._expire()
        now = self._clock()
        new = np.asarray(tokens, dtype=np.int64)
        kept = []
        for entry in self._entries:
            shared = _common_prefix(entry.tokens, new)
            if shared == n:  # already covered by a longer (or equal) entry
                entry.last_used = now
                return
            if shared < len(entry.tokens):
                kept.append(entry)  # entries that are a prefix of the new one are dropped
        self._entries = kept
        self._entries.append(_Entry(new, k.detach().clone(), v.detach().clone(), created=now, last_used=now))
        self._evict_to(self.max_tokens)

    def invalidate(self) -> int:
        """Drop every entry; returns how many were dropped. Statistics are kept."""
        dropped = len(self._entries)
        self._entries = []
        return dropped

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in self._entries)

    def stats(self) -> dict[str, float | int]:
        lookups = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "tokens_reused": self.tokens_reused,
            "entries": len(self._entries),
            "cached_tokens": self.num_tokens,
        }

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl_s
        self._entries = [e for e in self._entries if e.last_used >= cutoff]

    def _evict_to(self, budget: int) -> None:
        self._entries.sort(key=lambda e: e.last_used)
        total = self.num_tokens
        while self._entries and total > budget:
            total -= len(self._entries.pop(0).tokens)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m
