"""Prompts, scripted models, fault injection and event collection for engine/scheduler tests
(real engine, real model; the ``tok`` and ``model`` fixtures are in conftest.py).

Fault injection's seam: every sample of a request has its own detokenizer and stop matcher (``_Seq.detok`` /
``_Seq.stopper``); :func:`poison` makes those of ONE request raise from its ``after``-th token on,
so the fault is inside the engine's per-sequence handling of a real running batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


def prompt_for(tok, text: str) -> list[int]:
    return tok.encode(text, prepend=tok.get_bos_token_id())


def byte_token(tok, ch: str) -> int:
    return tok.enc.encode_single_token(ch.encode())


def scripted_model(factory, pairs: Iterable[tuple[int, int]]):
    """A real GPT whose weights make it predict ``b`` after ``a`` for each pair ``(a, b)``.

    Zeroing the attention/MLP output projections makes every block the identity, so the final
    hidden state is ``norm(wte[current token])``; setting ``lm_head[b]`` to that vector scores
    the successor at |h|² = n_embd while other tokens score ~N(0, n_embd) (argmax is certain).
    """
    pairs = list(pairs)
    sources = [a for a, _ in pairs]
    assert len(set(sources)) == len(sources), "each token of the script may lead to one successor"
    m = factory(seed=1, n_layer=2, n_embd=64, seq=128)
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        m.lm_head.weight.zero_()
        hidden = torch.nn.functional.rms_norm(m.transformer.wte.weight, (m.config.n_embd,))
        for a, b in pairs:
            m.lm_head.weight[b] += hidden[a]
    return m


def chain_model(factory, chain: list[int]):
    """:func:`scripted_model` that predicts ``chain[i + 1]`` after ``chain[i]``."""
    return scripted_model(factory, zip(chain[:-1], chain[1:]))


def tool_chain(tok, prompt: list[int], expr: str) -> list[int]:
    """The script of a reply that calls the calculator on ``expr`` and ends the turn."""
    sp = tok.encode_special
    body = [byte_token(tok, c) for c in expr]
    return [prompt[-1], sp("<|python_start|>"), *body, sp("<|python_end|>"), sp("<|assistant_end|>")]


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
