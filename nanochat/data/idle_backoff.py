"""Keep Ray Data's scheduling loop from spinning while it has nothing in flight.

Ray Data 2.60's streaming executor blocks (in ``ray.wait``) only while tasks are running. Once
backpressure holds every operator, the steady state of a training ingest whose buffer is full, its
loop runs back to back: measured at ~50% of a core in Ray Train's SplitCoordinator on 2 cores, CPU
taken from the Train worker. :class:`IdleBackoff` is an execution callback that :func:`install`
adds to a dataset's own ``DataContext`` (the trainer does it for every dataset it trains on): a step that
follows the previous one within ``IDLE_STEP_S`` did not wait, so it sleeps ``IDLE_SLEEP_S`` there.
Production resumes at most that late; the ingest buffer hides it from the trainer.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_STEP_S = 0.005
IDLE_SLEEP_S = 0.02


class IdleBackoff(ExecutionCallback):
    """Sleep briefly after scheduling steps that did not block."""

    def __init__(self) -> None:
        self._last = 0.0
        self.sleeps = 0

    def on_execution_step(self, executor) -> None:
        if time.perf_counter() - self._last < IDLE_STEP_S:
            time.sleep(IDLE_SLEEP_S)
            self.sleeps += 1
        self._last = time.perf_counter()


def install(ds):
    """Register :class:`IdleBackoff` on ``ds``'s own DataContext (not the process-wide one); returns ``ds``."""
    ctx = ds.context
    if IdleBackoff not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, IdleBackoff]
    return ds
