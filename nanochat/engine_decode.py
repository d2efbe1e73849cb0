"""The engine's decode step: one model forward of one new token for every running row.

:class:`Decoder` runs rows ``0..R-1`` of the engine's :class:`~nanochat.kv_cache.KVCache`
through the model with a :class:`~nanochat.kv_cache.DecodeView` (positions from the host, no
device-to-host sync inside the step), then advances those rows' lengths.

- **Eager** (the default): exactly ``R`` rows; attention reads the keys up to the longest
  row (no mask at all when every row is at the same position, e.g. batch 1).
- **Compiled** (``torch.compile(dynamic=False)``; ``compile="auto"`` turns it on for CUDA): shapes are fixed so a graph
  is reused every step: the row count is padded up to a bucket (powers of two up to the batch
  size; the padding rows decode garbage into free slots at position 0, which nothing reads), and
  attention always reads all ``max_len`` positions under a mask. On CUDA the mode is
  ``"reduce-overhead"`` (CUDA graphs; the cache buffers are marked static so the graphs write
  into them in place). One graph per bucket, built on first use or by :meth:`Decoder.warmup`.
  If building a graph fails, the decoder logs a warning and stays eager.

Greedy ids are the same compiled or eager and at any batch size, up to floating-point ties
(tested on a real model). Measured costs and gains: docs/engine.md.
"""

from __future__ import annotations

import time
from typing import Literal

import torch

from nanochat.common import get_logger
from nanochat.kv_cache import DecodeView, KVCache

log = get_logger("nanochat.engine")

CompileSetting = bool | Literal["auto"]


def resolve_compile(setting: CompileSetting, device: torch.device) -> bool:
    """``auto``: compile on CUDA only. On CPU a cold compile of the ``tiny`` model's step costs tens of
    seconds of CPU per batch bucket, paid back only after thousands of tokens (docs/engine.md)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def decode_forward(model, ids: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   keys: int, masked: bool) -> torch.Tensor:
    """Logits (B, vocab) of one new token per row: ``ids`` and ``pos`` are (B,), ``k``/``v`` the full buffers."""
    return model(ids[:, None], kv_cache=DecodeView(k, v, pos, keys, masked))[:, -1]


class Decoder:
    """Runs the decode forward of the running rows of ``cache`` (see the module docstring)."""

    def __init__(self, model, cache: KVCache, max_rows: int, compile: CompileSetting = False):
        self.model, self.cache, self.max_rows = model, cache, max_rows
        self.device = cache.k.device
        self.buckets = sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)})
        self._compiled = None
        self._built: set[int] = set()
        self.compile_seconds = 0.0  # wall time of the first call of each bucket (the compile)
        if resolve_compile(compile, self.device):
            self._compiled = self._make_compiled()

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _make_compiled(self):
        import torch._dynamo
        import torch._inductor.config

        if self.device.type == "cuda":
            torch._dynamo.mark_static_address(self.cache.k)
            torch._dynamo.mark_static_address(self.cache.v)
            return torch.compile(decode_forward, dynamic=False, mode="reduce-overhead")
        # A pool of compile workers on a small CPU host competes with serving for the same cores.
        torch._inductor.config.compile_threads = 1
        return torch.compile(decode_forward, dynamic=False)

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def __call__(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (R, vocab) for rows ``0..R-1`` fed ``ids`` at ``positions``; advances their lengths."""
        rows = len(ids)
        if self._compiled is not None:
            logits = self._run_compiled(ids, positions)
        else:
            top = max(positions)
            ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
            pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
            logits = decode_forward(self.model, ids_t, pos_t, self.cache.k, self.cache.v, top + 1,
                                    masked=min(positions) != top)
        self.cache.seqlens[:rows] += 1
        return logits

    def _run_compiled(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        rows = len(ids)
        size = self.bucket(rows)
        pad = size - rows
        ids_t = torch.tensor(ids + [0] * pad, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions + [0] * pad, dtype=torch.long, device=self.device)
        args = (self.model, ids_t, pos_t, self.cache.k, self.cache.v, self.cache.max_len, True)
        if size in self._built:
            logits = self._compiled(*args)
        else:
            start = time.perf_counter()
            try:
                logits = self._compiled(*args)
            except Exception as err:  # noqa: BLE001 - a graph that cannot be built: decode eagerly
                log.warning("compiled decode step failed to build (%s: %s); decoding eagerly",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self._compiled = None
                return decode_forward(*args[:5], max(positions) + 1, True)[:rows]
            self._built.add(size)
            self.compile_seconds += time.perf_counter() - start
        # Under CUDA graphs the output lives in a buffer the next replay overwrites: copy the rows out.
        return logits[:rows].clone() if self.device.type == "cuda" else logits[:rows]

    def warmup(self) -> float:
        """Build the compiled step of every bucket now (e.g. when a server replica starts, before any
        request); returns the seconds it took. Only while no row is running: it writes into free slots."""
        if self._compiled is None:
            return 0.0
        start = time.perf_counter()
        saved = self.cache.seqlens.clone()
        for size in self.buckets:
            if self._compiled is None:
                break
            self._run_compiled([0] * size, [0] * size)
        self.cache.seqlens.copy_(saved)
        return time.perf_counter() - start
