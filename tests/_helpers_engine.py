"""Fault injection and event collection for engine/scheduler tests (real engine, real model).

The seam: every sample of a request has its own detokenizer and stop matcher (``_Seq.detok`` /
``_Seq.stopper``); :func:`poison` makes those of ONE request raise from its ``after``-th token on,
so the fault is inside the engine's per-sequence handling of a real running batch.
"""

from __future__ import annotations

from dataclasses import dataclass


class InjectedFault(RuntimeError):
    """Raised by a poisoned detokenizer / stop matcher."""


def poison(engine, seq_id: int, after: int = 0, part: str = "detok") -> None:
    """Make ``part`` ("detok" or "stopper") of every sample of request ``seq_id`` raise on its
    ``after + 1``-th push (``after=0``: on the first token, chosen right after the prefill)."""
    for seq in engine._live[seq_id].seqs:
        target = getattr(seq, part)
        real, calls = target.push, [0]

        def push(value, real=real, calls=calls):
            calls[0] += 1
            if calls[0] > after:
                raise InjectedFault(f"injected {part} fault")
            return real(value)

        target.push = push


@dataclass
class Outcome:
    steps: list[tuple[int, str]]  # (token_id, text) of every event
    finish_reason: str | None
    error: str | None


def outcome(events) -> Outcome:
    last = events[-1]
    return Outcome([(e.token_id, e.text) for e in events], last.finish_reason if last.finished else None, last.error)


def drain(engine, max_steps: int = 10_000) -> dict[tuple[int, int], list]:
    """Step until the engine is idle; events grouped by ``(seq_id, sample index)``."""
    got: dict[tuple[int, int], list] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return got
        for event in engine.step():
            got.setdefault((event.seq_id, event.index), []).append(event)
    raise AssertionError("engine did not finish")
