"""The engine's decode step: one model forward of one new token for every running row.

:class:`Decoder` runs rows ``0..R-1`` of the engine's :class:`~nanochat.kv_cache.KVCache`
through the model with a :class:`~nanochat.kv_cache.DecodeView` (positions from the host, no
device-to-host sync inside the step), then advances those rows' lengths.

- **Eager**: exactly ``R`` rows; attention reads the keys up to the longest row (no mask at all
  when every row is at the same position, e.g. batch 1).
- **Compiled** (``torch.compile(dynamic=False)``): shapes are fixed so a graph is reused every
  step: the row count is padded up to a bucket (powers of two up to the batch size; the padding
  rows decode garbage into free slots at position 0, which nothing reads), and attention always
  reads all ``max_len`` positions under a mask. On CUDA the mode is ``"reduce-overhead"`` (CUDA
  graphs; the cache buffers are marked static so the graphs write into them in place). One graph
  per bucket, built on first use or by :meth:`Decoder.warmup`. If building a graph fails, the
  decoder logs a warning and stays eager.
- **Which** (``compile``): ``False`` eager; ``True`` every bucket compiled; ``"auto"``: on CUDA every
  bucket, on CPU decided by measurement in :meth:`Decoder.warmup` (see :func:`resolve_compile`):
  a CPU step pays per-op overhead that compiling removes (batch 1: ~1.5x faster) but reads all
  ``max_len`` positions, which costs more than it saves at larger batches.

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
CompileMode = Literal["off", "all", "measure"]

MEASURE_MARGIN = 0.10
"""``auto`` on CPU keeps a bucket compiled only if its step is at least this much faster than eager:
smaller gaps are within timing noise on a shared host, and an unused graph only costs memory."""


def resolve_compile(setting: CompileSetting, device: torch.device) -> CompileMode:
    """``False`` → ``"off"``, ``True`` → ``"all"`` (every bucket), ``"auto"`` → ``"all"`` on CUDA and
    ``"measure"`` elsewhere: :meth:`Decoder.warmup` compiles the buckets from the smallest up, times
    each against the eager step, keeps those at least :data:`MEASURE_MARGIN` faster and stops at the
    first that is not (larger batches gain less). Without ``warmup`` a ``"measure"`` decoder stays eager:
    a cold compile costs seconds to tens of seconds of CPU per bucket (docs/engine.md), too much for
    a caller that did not ask for it up front."""
    if setting == "auto":
        return "all" if device.type == "cuda" else "measure"
    return "all" if setting else "off"


def decode_forward(model, ids: torch.Tensor, pos: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
                   keys: int, masked: bool) -> torch.Tensor:
    """Logits (B, vocab) of one new token per row: ``ids`` and ``pos`` are (B,) (``pos`` may be None
    when not ``masked``: every row is at ``keys - 1``), ``k``/``v`` the full buffers."""
    return model(ids[:, None], kv_cache=DecodeView(k, v, pos, keys, masked))[:, -1]


class Decoder:
    """Runs the decode forward of the running rows of ``cache`` (see the module docstring)."""

    def __init__(self, model, cache: KVCache, max_rows: int, compile: CompileSetting = False):
        self.model, self.cache, self.max_rows = model, cache, max_rows
        self.device = cache.k.device
        self.buckets = sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)})
        self.mode = resolve_compile(compile, self.device)
        self._compiled = self._make_compiled() if self.mode != "off" else None
        # Buckets whose steps run the graph (if any): None = all of them; "measure" fills the set in warmup().
        self._use: set[int] | None = set() if self.mode == "measure" else None
        self._built: set[int] = set()
        self.compile_seconds = 0.0  # wall time of the first call of each bucket (the compile)
        self.measured: dict[int, dict[str, float]] = {}  # "measure": bucket -> step ms eager / compiled
        self.clock = time.perf_counter  # what the measurement times steps with (wall: what users wait)

    @property
    def compiled(self) -> bool:
        """Whether any decode step runs a compiled graph."""
        return self._compiled is not None and (self._use is None or bool(self._use))

    @property
    def compiled_buckets(self) -> list[int]:
        """The row buckets whose steps run a compiled graph."""
        if self._compiled is None:
            return []
        return list(self.buckets) if self._use is None else sorted(self._use)

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
        if self._compiled is not None and (self._use is None or self.bucket(rows) in self._use):
            logits = self._run_compiled(ids, positions)
        else:
            logits = self._run_eager(ids, positions)
        self.cache.seqlens[:rows] += 1
        return logits

    def _run_eager(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        top = max(positions)
        masked = min(positions) != top
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device) if masked else None
        return decode_forward(self.model, ids_t, pos_t, self.cache.k, self.cache.v, top + 1, masked)

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
        """Build the compiled step of every bucket now (``"measure"``: and choose the buckets that run it,
        see :func:`resolve_compile`), e.g. when a server replica starts, before any request; returns the
        seconds it took. Only while no row is running: it writes into free slots."""
        if self._compiled is None:
            return 0.0
        start = time.perf_counter()
        saved = self.cache.seqlens.clone()
        for size in self.buckets:
            self._run_compiled([0] * size, [0] * size)  # builds the bucket's graph
            if self._compiled is None:  # it failed to build: eager from here on
                break
            if self.mode == "measure":
                if not self._measure(size):
                    break
                self._use.add(size)
        if self.mode == "measure" and not self._use:
            self._compiled = None  # nothing pays: drop the graph
        self.cache.seqlens.copy_(saved)
        return time.perf_counter() - start

    def _measure(self, size: int, rounds: int = 7, steps: int = 3) -> bool:
        """Time the eager and the compiled step of ``size`` rows in alternation (best of ``rounds``) at a
        half-full context (eager attention reads that many keys, the graph all ``max_len``); True if the
        compiled one is at least :data:`MEASURE_MARGIN` faster. The bucket's graph is built already
        (:meth:`warmup`), so the timed calls run it."""
        ids, positions = [0] * size, [max(self.cache.max_len // 2 - 1, 0)] * size
        best = {"eager": float("inf"), "compiled": float("inf")}
        for _ in range(rounds):
            for name, run in (("eager", self._run_eager), ("compiled", self._run_compiled)):
                start = self.clock()
                for _ in range(steps):
                    run(ids, positions)
                best[name] = min(best[name], (self.clock() - start) / steps)
        faster = best["compiled"] < best["eager"] * (1 - MEASURE_MARGIN)
        self.measured[size] = {"eager_ms": round(best["eager"] * 1e3, 3), "compiled_ms": round(best["compiled"] * 1e3, 3)}
        log.info("decode step, %d row(s): eager %.2f ms, compiled %.2f ms -> %s", size, best["eager"] * 1e3,
                 best["compiled"] * 1e3, "compiled" if faster else "eager from here up")
        return faster
