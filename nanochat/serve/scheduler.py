"""Async continuous-batching scheduler: one engine, many concurrent requests.

The engine (:class:`nanochat.engine.Engine`) is synchronous: ``add`` queues a request of ``n``
samples, ``step`` decodes one token for every running sequence and prefills a bounded chunk of
queued prompts (so new requests join the running batch between steps without stalling it), and
``cancel`` frees a request's slots. This module drives it from asyncio: one background task runs
``step`` on a single worker thread (the event loop keeps serving HTTP while the model computes),
hands new requests and cancellations to the engine between steps, and routes each step's events
to per-request asyncio queues. Every engine call happens on that one thread, so the engine needs
no locking. This is the one admission layer (the engine itself queues without bound): past
``max_waiting`` queued requests :meth:`submit` raises :class:`QueueFull` (the API turns it into a
429); a request the engine can never serve (``EngineError`` from ``engine.add``) arrives in its
queue as that exception (a 400).

Failures stay with their owner. A sequence the engine could not continue arrives as a normal
event with ``finish_reason="error"`` (and ``error``) in its own request's queue only. Should
``engine.step`` itself raise (an engine bug), only the requests with a sequence running or
prefilling get the exception; queued ones go on. :attr:`Scheduler.healthy` turns False only after
:data:`UNHEALTHY_AFTER` consecutive steps whose model forward failed, and True again at the next
step without one; a per-sequence error never changes it.

It knows nothing about HTTP or OpenAI; :mod:`nanochat.serve.app` builds on it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nanochat.common import NanochatError, get_logger

log = get_logger(__name__)

DONE = None  # end-of-request marker in a request queue
UNHEALTHY_AFTER = 3  # consecutive failed steps before health reports degraded (one is a fluke or a bad request)


class QueueFull(NanochatError):
    """More requests are waiting than the server admits; the client should retry later."""


@dataclass
class Request:
    """One client request: ``groups`` prompts of ``n`` samples each, sharing one event queue.

    Queue items are ``(choice, TokenEvent)`` with ``choice = group * n + sample`` (a sample that
    failed ends with an event of ``finish_reason="error"`` and ``error`` set), an exception if the
    engine refused the request (an ``EngineError`` from ``engine.add``) or its step raised while
    this request was in flight, or :data:`DONE` once every sample has finished.
    """

    prompts: list[list[int]]
    params: list[Any]  # SamplingParams per prompt (same n for all)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_ids: list[int | None] = field(default_factory=list)
    remaining: list[int] = field(default_factory=list)  # unfinished samples per prompt
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.seq_ids = [None] * len(self.prompts)
        self.remaining = [p.n for p in self.params]

    @property
    def n(self) -> int:
        return self.params[0].n

    @property
    def finished(self) -> bool:
        return not any(self.remaining)


class Scheduler:
    """Runs ``engine.step()`` in a loop and multiplexes its events to waiting coroutines."""

    def __init__(self, engine: Any, max_waiting: int = 64):
        self.engine = engine
        self.max_waiting = max_waiting
        self._lock = threading.Lock()  # guards _pending / _to_cancel (event loop vs. step thread)
        self._pending: collections.deque[tuple[Request, int]] = collections.deque()
        self._to_cancel: list[Request] = []
        self._owners: dict[int, tuple[Request, int]] = {}  # engine seq id -> (request, prompt index)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.last_error: str | None = None  # latest failed forward / step, for /health
        self._failing_steps = 0  # consecutive steps whose model forward failed
        self._window: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self.total_requests = 0
        self.total_tokens = 0
        self.total_steps = 0
        self.peak_running = 0
        self.rejected = 0
        self.cancelled = 0
        self.failed_steps = 0
        self.seq_errors = 0

    @property
    def healthy(self) -> bool:
        """False after :data:`UNHEALTHY_AFTER` consecutive failed steps, until a step succeeds."""
        return self._failing_steps < UNHEALTHY_AFTER

    # ---- event-loop side ------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], params: list[Any]) -> Request:
        """Queue a request; raises :class:`QueueFull` when ``max_waiting`` requests already wait."""
        self._ensure_started()
        waiting = self.num_waiting
        if waiting + len(prompts) > self.max_waiting:
            self.rejected += 1
            raise QueueFull(
                f"server busy: {waiting} requests are already waiting (limit {self.max_waiting}); retry shortly"
            )
        request = Request(prompts=prompts, params=params)
        with self._lock:
            self._pending.extend((request, g) for g in range(len(prompts)))
        self.total_requests += 1
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        """Stop every sample of ``request``; its slots are freed before the next step."""
        if request.finished or request.cancelled:
            return
        request.cancelled = True
        with self._lock:
            self._to_cancel.append(request)
        self._wake.set()

    @property
    def num_running(self) -> int:
        return int(self.engine.num_running)

    @property
    def num_waiting(self) -> int:
        return int(self.engine.num_waiting) + len(self._pending)

    def stats(self) -> dict[str, Any]:
        now = time.perf_counter()
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()
        span = (now - self._window[0][0]) if self._window else 0.0
        tokens = sum(n for _, n in self._window)
        out: dict[str, Any] = {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "max_batch_size": self.engine.max_batch_size,
            "max_waiting": self.max_waiting,
            "peak_running": self.peak_running,
            "tokens_per_s": round(tokens / span, 2) if span > 0.05 else 0.0,
            "total_requests": self.total_requests,
            "total_tokens": self.total_tokens,
            "total_steps": self.total_steps,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "failed_steps": self.failed_steps,
            "seq_errors": self.seq_errors,
            "healthy": self.healthy,
        }
        cache = getattr(self.engine, "prefix_cache", None)
        if cache is not None:
            out["prefix_cache"] = cache.stats()
        return out

    async def run_in_engine_thread(self, fn, *args):
        """Run ``fn`` on the engine thread between steps (e.g. dropping the prefix cache)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the loop -------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._pending and not self._to_cancel and not self.engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                deliveries = await loop.run_in_executor(self._pool, self._tick_no_grad)
            except Exception as err:  # fails the requests in flight, not queued ones nor the server
                log.exception("engine step failed")
                self._step_failed(f"{type(err).__name__}: {err}")
                failed = await loop.run_in_executor(self._pool, self._fail_in_flight)
                for request in failed:
                    request.queue.put_nowait(RuntimeError(f"engine failure: {type(err).__name__}: {err}"))
                continue
            for request, item in deliveries:
                request.queue.put_nowait(item)

    def _tick_no_grad(self) -> list[tuple[Request, Any]]:
        # The engine's KV cache is created under inference mode; cancel/add touch it in place too.
        import torch

        with torch.inference_mode():
            return self._tick()

    def _tick(self) -> list[tuple[Request, Any]]:
        """One scheduling round on the engine thread: cancel, add, step; returns queue deliveries."""
        out: list[tuple[Request, Any]] = []
        with self._lock:
            cancels, self._to_cancel = self._to_cancel, []
            adds = list(self._pending)
            self._pending.clear()
        cancelled = {id(r) for r in cancels}
        for request in cancels:
            if not request.finished:
                self.cancelled += 1
            self._drop(request)
            out.append((request, DONE))
        for request, g in adds:
            if id(request) in cancelled or request.cancelled:
                continue
            try:
                seq_id = self.engine.add(request.prompts[g], request.params[g])
            except Exception as err:  # the engine refused it (EngineError); only this request fails
                self._drop(request)
                out.append((request, err))
                continue
            request.seq_ids[g] = seq_id
            self._owners[seq_id] = (request, g)
        if not self.engine.has_work():
            return out
        forward_failures = self.engine.forward_failures
        events = self.engine.step()
        if self.engine.forward_failures != forward_failures:
            self._step_failed(self.engine.last_error)
        else:
            self._failing_steps = 0
        self.total_steps += 1
        self.peak_running = max(self.peak_running, self.num_running)
        produced = 0
        for event in events:
            owner = self._owners.get(event.seq_id)
            if owner is None:
                continue  # cancelled while this step ran
            request, g = owner
            produced += event.finish_reason != "error"  # an error event carries no token
            out.append((request, (g * request.n + event.index, event)))
            if event.finished:
                self.seq_errors += event.finish_reason == "error"
                request.remaining[g] -= 1
                if request.remaining[g] == 0:
                    self._owners.pop(event.seq_id, None)
                    if request.finished:
                        out.append((request, DONE))
        self.total_tokens += produced
        self._window.append((time.perf_counter(), produced))
        return out

    def _drop(self, request: Request) -> None:
        for g, seq_id in enumerate(request.seq_ids):
            if seq_id is not None and self._owners.pop(seq_id, None) is not None:
                self.engine.cancel(seq_id)
            request.remaining[g] = 0

    def _step_failed(self, message: str | None) -> None:
        self.failed_steps += 1
        self._failing_steps += 1
        self.last_error = message

    def _fail_in_flight(self) -> list[Request]:
        """After ``engine.step`` raised: cancel the requests it may have touched (on the engine thread).

        Those are the ones with a sequence running or prefilling; requests still waiting in the
        engine's queue or in ``_pending`` (submitted during the step) are kept.
        """
        waiting = self.engine.waiting_ids()
        requests = {id(r): r for seq_id, (r, _) in self._owners.items() if seq_id not in waiting}
        import torch

        with torch.inference_mode():
            for request in requests.values():
                try:
                    self._drop(request)
                except Exception:
                    pass
        return list(requests.values())
