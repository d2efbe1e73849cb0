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


def test_compile_is_off_by_default_auto_only_on_cuda_and_it_can_be_forced_or_turned_off(model, tok):
    cpu = torch.device("cpu")
    assert not resolve_compile("auto", cpu) and resolve_compile(True, cpu) and not resolve_compile(False, cpu)
    assert resolve_compile("auto", torch.device("cuda"))
    for kwargs, expected in (({}, False), ({"compile": "auto"}, False), ({"compile": False}, False),
                             ({"compile": True}, True)):
        engine = Engine(model, tok, **kwargs)
        engine._ensure_cache()  # creates the decoder; a graph would only be built at the first decode step
        assert engine.decode_compiled is expected and engine.stats()["decode_compiled"] is expected
    assert Engine(model, tok, compile=False).warmup() == 0.0  # nothing to build


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
