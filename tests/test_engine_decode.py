"""The engine's decode step: eager vs the fixed-shape (compiled) path, batch 1 vs 16, the compile
switch, and batched sampling (real tiny GPT, real trained tokenizer, real torch.compile)."""

from __future__ import annotations

import logging

import pytest
import torch
from _helpers_engine import prompt_for

from nanochat.engine import Engine, SamplingParams
from nanochat.engine_decode import decode_forward, resolve_compile
from nanochat.sampling import sample_rows, sample_token

TEXTS = [
    "The quick brown fox", "To be, or not to be", "def add(a, b):", "Numbers 12345", "In the beginning",
    "The lazy dog", "whether 'tis nobler", "print(add(2, 3))", "3.14159 and", "God created the heaven",
    "that is the question", "jumps over", "return a + b", "67890 and dates", "and the earth", "Hamlet",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def prompts_for(tok, texts) -> list[list[int]]:
    return [prompt_for(tok, t) for t in texts]


def greedy_ids(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [c[0].tokens for c in engine.generate_many(prompts, params)]


def test_greedy_ids_are_identical_at_batch_1_and_batch_16(model, tok):
    prompts = prompts_for(tok, TEXTS)
    alone = [greedy_ids(Engine(model, tok, max_batch_size=1, compile=False), [p])[0] for p in prompts]
    batched = greedy_ids(Engine(model, tok, max_batch_size=16, compile=False, prefix_cache=False), prompts)
    assert batched == alone
    assert len({tuple(ids) for ids in alone}) > 1  # the prompts really lead to different answers


def test_fixed_shape_decode_path_gives_the_eager_greedy_ids(model, tok):
    """The path a compiled step runs (rows padded to a bucket, attention over all positions under a
    mask), executed without compiling: same ids as the eager step, while rows finish and buckets shrink."""
    prompts = prompts_for(tok, TEXTS[:5])
    ragged = [GREEDY.model_copy(update={"max_tokens": 3 + 2 * i}) for i in range(5)]  # rows finish one by one
    eager = Engine(model, tok, max_batch_size=8, compile=False, prefix_cache=False)
    fixed = Engine(model, tok, max_batch_size=8, compile=False, prefix_cache=False)
    fixed._ensure_cache()
    fixed._decoder._compiled = decode_forward  # the fixed-shape path, uncompiled
    sizes = []
    real_bucket = fixed._decoder.bucket
    fixed._decoder.bucket = lambda rows: sizes.append(real_bucket(rows)) or real_bucket(rows)
    assert greedy_ids(fixed, prompts, ragged) == greedy_ids(eager, prompts, ragged)
    assert {8, 4, 2, 1} <= set(sizes)  # 5 rows padded to 8, then 4, 2, 1 as they finish


def test_compile_is_off_by_default_auto_measures_on_cpu_and_it_can_be_forced_or_turned_off(model, tok):
    cpu = torch.device("cpu")
    assert [resolve_compile(s, cpu) for s in (False, True, "auto")] == ["off", "all", "measure"]
    assert resolve_compile("auto", torch.device("cuda")) == "all"
    for kwargs, expected in (({}, False), ({"compile": "auto"}, False), ({"compile": False}, False),
                             ({"compile": True}, True)):
        engine = Engine(model, tok, **kwargs)
        engine._ensure_cache()  # creates the decoder; a graph would only be built at the first decode step
        assert engine.decode_compiled is expected and engine.stats()["decode_compiled"] is expected
    # auto on CPU without warmup(): eager at every batch size (nothing compiles behind the caller's back)
    assert Engine(model, tok, compile="auto").stats()["decode_compiled_buckets"] == []
    assert Engine(model, tok, compile=False).warmup() == 0.0  # nothing to build


def _timed_fakes(engine: Engine, compiled_ms: dict[int, float], eager_ms: float) -> list[int]:
    """Known step times for the measurement in warmup(), on a fake clock: the compiled step is the real
    fixed-shape path, uncompiled, taking ``compiled_ms[rows]``; the eager step the real one taking
    ``eager_ms``. Returns the row counts the stand-in graph was called with, in order."""
    from nanochat.engine_decode import decode_forward

    decoder, built, now = engine._decoder, [], [0.0]

    def compiled(model, ids, *rest):
        if ids.shape[0] not in built:
            built.append(ids.shape[0])
        now[0] += compiled_ms[ids.shape[0]] / 1e3
        return decode_forward(model, ids, *rest)

    real_eager = decoder._run_eager

    def eager(ids, positions):
        now[0] += eager_ms / 1e3
        return real_eager(ids, positions)

    decoder._compiled, decoder._run_eager, decoder.clock = compiled, eager, lambda: now[0]
    return built


def test_auto_on_cpu_keeps_the_batch_sizes_whose_compiled_step_measures_faster_and_stops_at_the_first_slower(
        model, tok):
    engine = Engine(model, tok, max_batch_size=16, compile="auto", prefix_cache=False)
    engine._ensure_cache()
    built = _timed_fakes(engine, {1: 5.0, 2: 8.9, 4: 12.0, 8: 1.0, 16: 1.0}, eager_ms=10.0)
    engine.warmup()
    assert built == [1, 2, 4]  # 4 rows measured slower: 8 and 16 are never built
    assert engine.stats()["decode_compiled_buckets"] == [1, 2] and engine.decode_compiled
    assert engine._decoder.measured == {1: {"eager_ms": 10.0, "compiled_ms": 5.0},
                                        2: {"eager_ms": 10.0, "compiled_ms": 8.9},
                                        4: {"eager_ms": 10.0, "compiled_ms": 12.0}}
    # decoding: 1-2 rows through the (stand-in) graph, 3+ rows eager; the ids are those of an eager engine
    prompts = prompts_for(tok, TEXTS[:3])
    calls = []
    real = engine._decoder._run_compiled
    engine._decoder._run_compiled = lambda ids, pos: calls.append(len(ids)) or real(ids, pos)
    ragged = [GREEDY.model_copy(update={"max_tokens": 3 + 3 * i}) for i in range(3)]
    eager = Engine(model, tok, max_batch_size=16, compile=False, prefix_cache=False)
    assert greedy_ids(engine, prompts, ragged) == greedy_ids(eager, prompts, ragged)
    assert calls and set(calls) == {1, 2}  # after the first rows finish


def test_auto_on_cpu_drops_the_graph_when_even_one_row_is_not_faster_compiled(model, tok):
    engine = Engine(model, tok, max_batch_size=4, compile="auto", prefix_cache=False)
    engine._ensure_cache()
    built = _timed_fakes(engine, {1: 9.5, 2: 1.0, 4: 1.0}, eager_ms=10.0)  # 5% faster: within the margin
    engine.warmup()
    assert built == [1] and not engine.decode_compiled and engine.stats()["decode_compiled_buckets"] == []


def test_a_compiled_step_that_cannot_be_built_falls_back_to_eager(model, tok, caplog):
    prompts = prompts_for(tok, TEXTS[:3])
    expected = greedy_ids(Engine(model, tok, compile=False), prompts)
    engine = Engine(model, tok, compile=False, prefix_cache=False)
    engine._ensure_cache()

    def broken(*args):
        raise RuntimeError("no C++ compiler (injected)")

    engine._decoder._compiled = broken
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert greedy_ids(engine, prompts) == expected
    assert not engine.decode_compiled and "decoding eagerly" in caplog.text


@pytest.mark.slow
def test_greedy_ids_are_identical_compiled_and_eager(model, tok):
    """Real torch.compile (inductor, CPU): one graph per bucket used (here 2 rows, then 1)."""
    prompts = prompts_for(tok, TEXTS[:2])
    eager = greedy_ids(Engine(model, tok, max_batch_size=2, compile=False, prefix_cache=False), prompts)
    engine = Engine(model, tok, max_batch_size=2, compile=True, prefix_cache=False)
    assert greedy_ids(engine, prompts) == eager
    assert greedy_ids(engine, prompts[1:]) == eager[1:]  # batch 1: its own bucket
    assert engine.decode_compiled  # no fallback happened: the ids came from compiled graphs


def test_batched_sampling_draws_each_row_as_it_would_alone():
    logits = torch.randn(6, 384, generator=torch.Generator().manual_seed(0))
    settings = [(1.0, None, None), (0.5, 5, None), (2.0, None, 0.9), (1.0, 50, 0.8), (0.7, None, None), (1.0, 3, None)]
    temps, ks, ps = (list(col) for col in zip(*settings))
    together, bad = sample_rows(logits, temps, ks, ps, [torch.Generator().manual_seed(i) for i in range(6)])
    alone = [sample_token(logits[i], *settings[i], torch.Generator().manual_seed(i)) for i in range(6)]
    assert together == alone and not any(bad)
    assert together[1] in set(torch.topk(logits[1], 5).indices.tolist())


def test_batched_sampling_flags_rows_without_usable_logits_and_samples_the_rest():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    logits[1] = float("nan")
    ids, bad = sample_rows(logits, [1.0] * 3, [None] * 3, [None] * 3, [torch.Generator().manual_seed(0)] * 3)
    assert bad == [False, True, False] and all(0 <= i < 64 for i in ids)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -8.0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(logits, 1.0, top_k=3, generator=gen) for _ in range(3000)])
    want = torch.softmax(logits[:3], dim=0)
    got = torch.bincount(draws, minlength=5).float() / len(draws)
    assert got[3:].sum() == 0
    torch.testing.assert_close(got[:3], want, atol=0.03, rtol=0)
