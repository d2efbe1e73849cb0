"""The async scheduler driving a real engine on a tiny real model: one request never fails another.

Faults are injected into a real running batch (a poisoned detokenizer of one request, a model
forward hook that raises), never by mocking the engine.
"""

from __future__ import annotations

import asyncio

import pytest
from _helpers_engine import poison, prompt_for

from nanochat.engine import Engine, SamplingParams
from nanochat.serve.scheduler import DONE, UNHEALTHY_AFTER, QueueFull, Scheduler

TEXTS = [
    "The quick brown fox", "To be, or not to be", "def add(a, b):", "Numbers 12345", "In the beginning",
    "The lazy dog", "whether 'tis nobler", "print(add(2, 3))", "3.14159 and", "God created the heaven",
    "émojis 🎉 and", "that is the question",
]
TIMEOUT_S = 300  # generous: CI machines are shared; nothing here is timed


async def collect(request) -> list:
    """Every queue item of one scheduler request up to DONE (or an exception, which ends it too)."""
    items = []
    while True:
        item = await request.queue.get()
        if item is DONE:
            return items
        items.append(item)
        if isinstance(item, BaseException):
            return items


def tokens_and_text(items) -> tuple[list[int], str, str]:
    events = [ev for _, ev in items]
    tokens = [e.token_id for e in events if not e.ends_turn]
    return tokens, "".join(e.text for e in events), events[-1].finish_reason


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def test_twelve_requests_one_with_tiny_temperature_one_faulty_all_others_complete_normally(model, tok):
    params = [SamplingParams(max_tokens=10, temperature=0.8 if i % 2 else 0, seed=i) for i in range(12)]
    params[3] = SamplingParams(max_tokens=10, temperature=1e-40, seed=3)  # the poison value
    prompts = [prompt_for(tok, t) for t in TEXTS]
    reference_params = [p.model_copy(update={"temperature": 0.0}) if i == 3 else p for i, p in enumerate(params)]
    reference = Engine(model, tok).generate_many(prompts, reference_params)

    engine = Engine(model, tok, max_batch_size=16)
    faulty = prompts[7]
    real_add = engine.add

    def add(prompt, sampling=None):  # fault injection: request 7's detokenizer raises on its 3rd token
        seq_id = real_add(prompt, sampling)
        if prompt is faulty:
            poison(engine, seq_id, after=2)
        return seq_id

    engine.add = add
    health: list[bool] = []

    async def main():
        scheduler = Scheduler(engine, max_waiting=64)
        requests = [scheduler.submit([p], [sp]) for p, sp in zip(prompts, params)]
        watching = True

        async def watch():
            while watching:
                health.append(scheduler.healthy)
                await asyncio.sleep(0.005)

        watcher = asyncio.get_running_loop().create_task(watch())
        results = await asyncio.gather(*(collect(r) for r in requests))
        watching = False
        await watcher
        stats = scheduler.stats()
        await scheduler.close()
        return results, stats

    results, stats = run(main())
    for i, items in enumerate(results):
        assert not any(isinstance(item, BaseException) for item in items), (i, items)
        if i == 7:
            last = items[-1][1]
            assert last.finish_reason == "error" and "injected detok fault" in last.error
            assert [ev.token_id for _, ev in items[:-1]] == reference[i][0].tokens[:2]
            continue
        tokens, text, reason = tokens_and_text(items)
        assert (tokens, text, reason) == (reference[i][0].tokens, reference[i][0].text, reference[i][0].finish_reason), i
    assert health and all(health)
    assert stats["healthy"] and stats["seq_errors"] == 1 and stats["failed_steps"] == 0
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_a_failed_batched_forward_fails_only_the_requests_in_it_and_health_stays_ok(model, tok):
    params = SamplingParams(max_tokens=8, temperature=0)
    engine = Engine(model, tok, max_batch_size=2, prefix_cache=False)
    queued_prompt = prompt_for(tok, TEXTS[2])
    alone = Engine(model, tok).generate_batch(queued_prompt, params)[0]
    fired = []

    def boom(_module, inputs):  # the first batched decode of two rows fails, once
        if inputs[0].shape == (2, 1) and not fired:
            fired.append(True)
            raise RuntimeError("injected forward fault")

    hook = model.register_forward_pre_hook(boom)

    async def main():
        scheduler = Scheduler(engine, max_waiting=8)
        running = [scheduler.submit([prompt_for(tok, t)], [params]) for t in TEXTS[:2]]
        queued = scheduler.submit([queued_prompt], [params])  # no free slot until the others end
        results = await asyncio.gather(*(collect(r) for r in [*running, queued]))
        healthy, stats = scheduler.healthy, scheduler.stats()
        await scheduler.close()
        return results, healthy, stats

    try:
        results, healthy, stats = run(main())
    finally:
        hook.remove()
    assert fired
    for items in results[:2]:
        last = items[-1][1]
        assert last.finish_reason == "error" and "injected forward fault" in last.error
    assert tokens_and_text(results[2]) == (alone.tokens, alone.text, alone.finish_reason)
    assert healthy and stats["failed_steps"] == 1 and stats["seq_errors"] == 2


def test_health_degrades_after_consecutive_failed_steps_and_recovers_on_success(model, tok):
    params = SamplingParams(max_tokens=4, temperature=0)
    engine = Engine(model, tok, max_batch_size=4, prefix_cache=False)

    def boom(_module, _inputs):
        raise RuntimeError("injected: every forward fails")

    async def main():
        scheduler = Scheduler(engine, max_waiting=8)
        hook = model.register_forward_pre_hook(boom)
        try:
            failing = [scheduler.submit([prompt_for(tok, t)], [params]) for t in TEXTS[:UNHEALTHY_AFTER]]
            failed = await asyncio.gather(*(collect(r) for r in failing))
        finally:
            hook.remove()
        degraded, error = scheduler.healthy, scheduler.last_error
        ok = await collect(scheduler.submit([prompt_for(tok, TEXTS[5])], [params]))
        recovered = scheduler.healthy
        await scheduler.close()
        return failed, degraded, error, ok, recovered

    failed, degraded, error, ok, recovered = run(main())
    assert all(items[-1][1].finish_reason == "error" for items in failed)
    assert not degraded and "every forward fails" in error
    assert ok[-1][1].finish_reason in ("stop", "length") and recovered


def test_an_exception_escaping_the_engine_step_fails_only_requests_in_flight(model, tok):
    params = SamplingParams(max_tokens=6, temperature=0)
    engine = Engine(model, tok, max_batch_size=1)
    real_insert, calls = engine.prefix_cache.insert, []

    def insert(*args, **kwargs):  # stands in for an engine bug outside the guarded per-sequence paths
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected engine bug")
        return real_insert(*args, **kwargs)

    engine.prefix_cache.insert = insert
    waiting_prompt = prompt_for(tok, TEXTS[1])
    alone = Engine(model, tok).generate_batch(waiting_prompt, params)[0]

    async def main():
        scheduler = Scheduler(engine, max_waiting=8)
        in_flight = scheduler.submit([prompt_for(tok, TEXTS[0])], [params])
        waiting = scheduler.submit([waiting_prompt], [params])  # batch of 1: queued in the engine
        results = await asyncio.gather(collect(in_flight), collect(waiting))
        stats = scheduler.stats()
        await scheduler.close()
        return results, stats

    (first, second), stats = run(main())
    assert len(first) == 1 and isinstance(first[0], RuntimeError) and "injected engine bug" in str(first[0])
    assert tokens_and_text(second) == (alone.tokens, alone.text, alone.finish_reason)
    assert stats["failed_steps"] == 1 and stats["healthy"]


def test_submissions_beyond_max_waiting_raise_queue_full_and_the_admitted_ones_complete(model, tok):
    """The scheduler is the one admission layer (the engine itself queues without bound)."""
    params = SamplingParams(max_tokens=3, temperature=0)
    engine = Engine(model, tok, max_batch_size=1)

    async def main():
        scheduler = Scheduler(engine, max_waiting=2)
        admitted = [scheduler.submit([prompt_for(tok, t)], [params]) for t in TEXTS[:2]]
        with pytest.raises(QueueFull, match="retry"):
            scheduler.submit([prompt_for(tok, TEXTS[2])], [params])
        with pytest.raises(QueueFull):  # a batch of 3 prompts never fits 2 waiting places
            scheduler.submit([prompt_for(tok, t) for t in TEXTS[3:6]], [params] * 3)
        results = await asyncio.gather(*(collect(r) for r in admitted))
        stats = scheduler.stats()
        await scheduler.close()
        return results, stats

    results, stats = run(main())
    assert all(items[-1][1].finish_reason in ("stop", "length") for items in results)
    assert stats["rejected"] == 2 and stats["total_requests"] == 2
