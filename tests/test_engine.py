"""The inference engine on a real tiny GPT and a real trained BPE tokenizer (no mocks)."""

from __future__ import annotations

import logging

import pytest
import torch
from _helpers_engine import byte_token, chain_model, prompt_for, tool_chain

from nanochat.detok import IncrementalDetokenizer, StopMatcher
from nanochat.engine import ContextLengthError, Engine, EngineError, SamplingParams, sample_token
from nanochat.prefix_cache import PrefixCache
from nanochat.tools import use_calculator

# ---- KV cache and greedy decoding ----------------------------------------------------------------


def test_kv_cache_decode_logits_equal_full_forward_for_rows_of_different_lengths(model, tok):
    prompts = [prompt_for(tok, "The quick brown fox"), prompt_for(tok, "To be, or not to be, that is")]
    cache = model.new_kv_cache(batch=2, max_len=64)
    with torch.no_grad():
        for row, p in enumerate(prompts):
            model(torch.tensor([p]), kv_cache=cache.rows(row, row + 1))
        seqs = [list(p) for p in prompts]
        for step in range(6):
            new = [10 + step, 20 + step]
            logits = model(torch.tensor([[t] for t in new]), kv_cache=cache)[:, -1]
            for row, t in enumerate(new):
                seqs[row].append(t)
                full = model(torch.tensor([seqs[row]]))[0, -1]
                torch.testing.assert_close(logits[row], full, atol=1e-4, rtol=0)


def test_greedy_generation_equals_argmax_of_full_forward(model, tok):
    prompt = prompt_for(tok, "The quick brown fox")
    got = Engine(model, tok).generate_batch(prompt, SamplingParams(max_tokens=16, temperature=0.0))[0]
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(16):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in (tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()):
                break
            ids.append(nxt)
            expected.append(nxt)
    assert got.tokens == expected
    assert got.finish_reason == ("length" if len(expected) == 16 else "stop")
    assert got.text == tok.decode(expected)


def test_temperature_zero_ignores_seed(model, tok):
    engine, prompt = Engine(model, tok), prompt_for(tok, "Numbers 12345")
    a = engine.generate_batch(prompt, SamplingParams(max_tokens=12, temperature=0, seed=1))[0]
    b = engine.generate_batch(prompt, SamplingParams(max_tokens=12, temperature=0, seed=999))[0]
    assert a.tokens == b.tokens


# ---- sampling and seeds --------------------------------------------------------------------------


def test_same_seed_gives_same_text_alone_and_inside_a_batch(model, tok):
    prompt = prompt_for(tok, "In the beginning")
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, seed=1234)
    alone = Engine(model, tok).generate_batch(prompt, params)[0]
    engine = Engine(model, tok)
    others = [prompt_for(tok, "def add(a, b):"), prompt_for(tok, "The quick")]
    results = engine.generate_many(
        [others[0], prompt, others[1]],
        [
            SamplingParams(max_tokens=25, temperature=0.8, seed=5),
            params,
            SamplingParams(max_tokens=7, seed=None),
        ],
    )
    assert results[1][0].tokens == alone.tokens
    assert results[1][0].text == alone.text
    different = Engine(model, tok).generate_batch(prompt, params.model_copy(update={"seed": 4321}))[0]
    assert different.tokens != alone.tokens


def test_n_samples_come_from_one_prefill_and_sample_their_own_first_token(model, tok):
    prompt = prompt_for(tok, "The quick brown fox jumps")
    engine = Engine(model, tok, prefix_cache=False)
    prefill_calls = []
    hook = model.register_forward_pre_hook(
        lambda mod, args: prefill_calls.append(args[0].shape[1]) if args[0].shape[1] > 1 else None
    )
    try:
        outs = engine.generate_batch(prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=7, n=6))
    finally:
        hook.remove()
    assert prefill_calls == [len(prompt)]
    assert [c.index for c in outs] == list(range(6))
    assert len({c.tokens[0] for c in outs}) > 1, "every row must sample its own first token"
    again = Engine(model, tok).generate_batch(
        prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=7, n=6)
    )
    assert [c.tokens for c in again] == [c.tokens for c in outs]


def test_top_k_one_and_tiny_top_p_are_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g)
    best = int(logits.argmax())
    assert sample_token(logits, 1.0, top_k=1, generator=g) == best
    assert sample_token(logits, 1.0, top_p=1e-6, generator=g) == best
    assert all(
        sample_token(logits, 0.7, top_k=5, generator=g) in set(torch.topk(logits, 5).indices.tolist())
        for _ in range(50)
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": 0},
        {"max_tokens": 0},
        {"n": 0},
        {"nonsense": 1},
    ],
)
def test_sampling_params_reject_invalid_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---- stops ---------------------------------------------------------------------------------------


def test_assistant_end_stops_with_reason_stop(tiny_model_factory, tok):
    prompt = prompt_for(tok, "hi")
    chain = [prompt[-1], byte_token(tok, "x"), byte_token(tok, "y"), tok.encode_special("<|assistant_end|>")]
    m = chain_model(tiny_model_factory, chain)
    events = [
        e
        for step in Engine(m, tok).generate(prompt, SamplingParams(max_tokens=20, temperature=0))
        for e in step
    ]
    assert [e.token_id for e in events] == chain[1:]
    assert events[-1].finished and events[-1].finish_reason == "stop" and events[-1].text == ""
    done = Engine(m, tok).generate_batch(prompt, SamplingParams(max_tokens=20, temperature=0))[0]
    assert done.tokens == chain[1:3] and done.text == "xy" and done.finish_reason == "stop"


def test_bos_token_also_stops(tiny_model_factory, tok):
    prompt = prompt_for(tok, "hi")
    m = chain_model(tiny_model_factory, [prompt[-1], byte_token(tok, "z"), tok.get_bos_token_id()])
    done = Engine(m, tok).generate_batch(prompt, SamplingParams(max_tokens=20, temperature=0))[0]
    assert (done.text, done.finish_reason) == ("z", "stop")


def test_stop_string_truncates_text_and_never_streams_it(tiny_model_factory, tok):
    prompt = prompt_for(tok, "hi")
    chain = [prompt[-1]] + [byte_token(tok, c) for c in "ab,STOPnow"]
    m = chain_model(tiny_model_factory, chain)
    events = [
        e
        for s in Engine(m, tok).generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=["STOP"]))
        for e in s
    ]
    assert "".join(e.text for e in events) == "ab,"
    assert events[-1].finish_reason == "stop" and len(events) == 7  # a b , S T O P


def test_max_tokens_finishes_with_length(model, tok):
    done = Engine(model, tok).generate_batch(
        prompt_for(tok, "The"), SamplingParams(max_tokens=3, temperature=0)
    )[0]
    assert len(done.tokens) <= 3
    if len(done.tokens) == 3:
        assert done.finish_reason == "length"


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["STOP", "\n\n"])
    out = [m.push(d) for d in ["ab S", "T", "x", "\n", "\nrest"]]
    assert out == ["ab ", "", "STx", "", ""]
    assert m.stopped and m.flush() == ""
    free = StopMatcher(["END"])
    assert free.push("the E") == "the " and free.flush() == "E"


# ---- tool use ------------------------------------------------------------------------------------


def test_python_block_gets_calculator_output_injected(tiny_model_factory, tok):
    sp = tok.encode_special
    prompt = prompt_for(tok, "hi")
    chain = tool_chain(tok, prompt, "7*6")
    m = chain_model(tiny_model_factory, chain)
    with torch.no_grad():  # after the injected output the model ends the turn
        m.lm_head.weight[sp("<|assistant_end|>")] += torch.nn.functional.rms_norm(
            m.transformer.wte.weight[sp("<|output_end|>")], (64,)
        )
    events = [
        e for s in Engine(m, tok).generate(prompt, SamplingParams(max_tokens=30, temperature=0)) for e in s
    ]
    injected = [sp("<|output_start|>"), *tok.encode("42"), sp("<|output_end|>")]
    assert [e.token_id for e in events] == chain[1:-1] + injected + [sp("<|assistant_end|>")]
    assert [e.forced for e in events] == [False] * (len(chain) - 2) + [True] * len(injected) + [False]
    text = "".join(e.text for e in events)
    assert text == "<|python_start|>7*6<|python_end|><|output_start|>42<|output_end|>"


def test_refused_python_block_injects_nothing(tiny_model_factory, tok):
    prompt = prompt_for(tok, "hi")
    chain = tool_chain(tok, prompt, "o.s")  # an attribute access: refused by the calculator
    m = chain_model(tiny_model_factory, chain)
    done = Engine(m, tok).generate_batch(prompt, SamplingParams(max_tokens=30, temperature=0))[0]
    assert done.tokens == chain[1:-1] and done.finish_reason == "stop"
    off = Engine(m, tok).generate_batch(
        prompt, SamplingParams(max_tokens=30, temperature=0, use_tools=False)
    )[0]
    assert off.tokens == chain[1:-1]


@pytest.mark.parametrize(
    "expr,value",
    [
        ("1+2", 3),
        ("7*6", 42),
        ("1,234 * 2", 2468),
        ("10/4", 2.5),
        ("7//2", 3),
        ("-3**2", -9),
        ("2**10", 1024),
        ("(1.5+2.5)*3", 12.0),
        ("17 % 5", 2),
        ("'strawberry'.count('r')", 3),
        ('"a,b,c".count(",")', 2),
    ],
)
def test_calculator_evaluates_arithmetic_and_count(expr, value):
    assert use_calculator(expr) == value


ATTACKS = [
    "__import__('os').system('echo pwned')",
    "open('/etc/passwd').read()",
    "exec('1')",
    "eval('1+1')",
    "().__class__.__bases__[0].__subclasses__()",
    "globals()",
    "x",
    "x+1",
    "'a'.upper()",
    "'a'.count",
    "'abc'.count('a', 0)",
    "len('abc')",
    "[1,2,3]",
    "{1: 2}",
    "lambda: 1",
    "(lambda: 1)()",
    "1 if 1 else 2",
    "9**9**9",
    "10**100000",
    "2**4097",
    "(10**600)*(10**600)",
    "'a'*10**9",
    "'a'+'b'",
    "1/0",
    "1e308*10",
    "import os",
    "__builtins__",
    "().__class__",
    "'x'.count(chr(120))",
    "[x for x in range(10**9)]",
    "f'{1}'",
    "b'a'.count(b'a')",
    "1; 2",
    "a := 1",
    "(" * 600 + "1" + ")" * 600,
    "",
    "   ",
    "True+1",
    "'abc'",
    "1 < 2",
    "~1",
    "not 1",
    "1 and 2",
    "'a'.count('a').bit_length()",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_calculator_refuses_anything_but_arithmetic(attack):
    assert use_calculator(attack) is None


# ---- UTF-8 streaming -----------------------------------------------------------------------------


def test_streaming_never_emits_half_a_code_point(tiny_model_factory, tok):
    prompt = prompt_for(tok, "hi")
    raw = "🎉日中".encode()
    chain = [
        prompt[-1],
        *[tok.enc.encode_single_token(bytes([b])) for b in raw],
        tok.encode_special("<|assistant_end|>"),
    ]
    m = chain_model(tiny_model_factory, chain)
    events = [
        e for s in Engine(m, tok).generate(prompt, SamplingParams(max_tokens=30, temperature=0)) for e in s
    ]
    texts = [e.text for e in events]
    assert "".join(texts) == "🎉日中"
    assert all("\ufffd" not in t for t in texts)
    assert texts[:4] == ["", "", "", "🎉"] and texts[4:10] == ["", "", "日", "", "", "中"]


def test_incremental_detokenizer_on_real_tokens(tok):
    text = "日本語のテキストと中文文本, 한국어 텍스트, émojis 🎉🚀 café naïve"
    detok = IncrementalDetokenizer(lambda t: tok.decode_bytes([t]))
    pieces = [detok.push(t) for t in tok.encode(text)] + [detok.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    cut = IncrementalDetokenizer(lambda t: tok.decode_bytes([t]))
    cut.push(tok.enc.encode_single_token(b"\xf0"))
    assert cut.flush() == "\ufffd"  # a stream that ends mid-character is not silently dropped


# ---- continuous batching -------------------------------------------------------------------------


def test_sequences_added_mid_run_match_running_alone(model, tok):
    params = SamplingParams(max_tokens=15, temperature=0)
    prompts = [
        prompt_for(tok, t) for t in ["The quick brown fox", "Numbers 12345 67890 and", "def add(a, b):\n" * 3]
    ]
    alone = [Engine(model, tok).generate_batch(p, params)[0].tokens for p in prompts]
    engine = Engine(model, tok, max_batch_size=4, prefill_chunk=5, prefix_cache=False)
    got: dict[int, list[int]] = {}
    ids = [engine.add(prompts[0], params)]
    for _ in range(4):
        for e in engine.step():
            got.setdefault(e.seq_id, []).append(e)
    ids += [engine.add(prompts[1], params), engine.add(prompts[2], params)]
    seen_running = 0
    while engine.has_work():
        for e in engine.step():
            got.setdefault(e.seq_id, []).append(e)
        seen_running = max(seen_running, engine.num_running)
    assert seen_running >= 2
    for i, seq_id in enumerate(ids):
        tokens = [e.token_id for e in got[seq_id] if not (e.finished and e.finish_reason == "stop")]
        assert tokens == alone[i]


def test_cancel_frees_the_slot_at_once(model, tok):
    engine = Engine(model, tok, max_batch_size=1)
    params = SamplingParams(max_tokens=50, temperature=0)
    first = engine.add(prompt_for(tok, "The quick"), params)
    engine.step()
    second = engine.add(prompt_for(tok, "To be"), params)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    assert engine.cancel(first)
    assert engine.num_running == 0
    events = engine.step()
    assert engine.num_running == 1 and {e.seq_id for e in events} == {second}
    assert not engine.cancel(12345)


def test_engine_works_under_inference_mode_and_cancels_outside_it(model, tok):
    engine = Engine(model, tok)
    with torch.inference_mode():
        seq_id = engine.add(prompt_for(tok, "The quick"), SamplingParams(max_tokens=30, temperature=0))
        engine.step()
        engine.step()
    assert engine.cancel(seq_id) and engine.num_running == 0
    assert engine.generate_batch(prompt_for(tok, "The"), SamplingParams(max_tokens=3))[0].tokens


def test_prefill_budget_interleaves_with_running_decodes(model, tok):
    engine = Engine(model, tok, max_batch_size=4, prefill_chunk=4, prefix_cache=False)
    engine.add(prompt_for(tok, "The"), SamplingParams(max_tokens=40, temperature=0))
    engine.step()
    long = engine.add(
        prompt_for(tok, "The quick brown fox jumps over the lazy dog. " * 2),
        SamplingParams(max_tokens=5, temperature=0),
    )
    steps_until_first = 0
    while True:
        events = engine.step()
        steps_until_first += 1
        assert any(e.seq_id != long for e in events), "the running stream must advance every step"
        if any(e.seq_id == long for e in events):
            break
    assert steps_until_first > 2


# ---- prefix cache --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, temperature=0.9, seed=11)],
)
def test_prefix_cache_gives_identical_results_and_counts_hits(model, tok, params):
    turn1 = {"messages": [{"role": "user", "content": "The quick brown fox"}]}
    on, off = Engine(model, tok), Engine(model, tok, prefix_cache=False)
    r_on = on.generate_batch(tok.render_for_completion(turn1), params)[0]
    r_off = off.generate_batch(tok.render_for_completion(turn1), params)[0]
    assert r_on.tokens == r_off.tokens
    turn2 = {
        "messages": turn1["messages"]
        + [{"role": "assistant", "content": r_on.text}, {"role": "user", "content": "and the lazy dog?"}]
    }
    prompt2 = tok.render_for_completion(turn2)
    assert on.generate_batch(prompt2, params)[0].tokens == off.generate_batch(prompt2, params)[0].tokens
    stats = on.stats()["prefix_cache"]
    assert stats["hits"] >= 1 and stats["tokens_reused"] >= len(tok.render_for_completion(turn1)) - 1
    assert 0 < stats["hit_rate"] <= 1
    on.prefix_cache.invalidate()
    assert on.prefix_cache.stats()["entries"] == 0


def test_prefix_cache_evicts_by_size_and_age():
    now = [0.0]
    cache = PrefixCache(max_tokens=10, ttl_s=5.0, min_tokens=2, clock=lambda: now[0])
    kv = torch.zeros(1, 6, 1, 1)
    cache.insert([1, 2, 3, 4, 5, 6], kv, kv)
    assert cache.lookup([1, 2, 3, 9])[0] == 3
    cache.insert([7, 8, 9, 10, 11, 12], kv, kv)  # 12 tokens > 10: the least recently used goes
    assert cache.lookup([1, 2, 3, 4])[0] == 0 and cache.lookup([7, 8, 9, 10, 0])[0] == 4
    now[0] = 100.0
    assert cache.lookup([7, 8, 9, 10, 0])[0] == 0  # expired
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 2


# ---- context, convenience, errors ----------------------------------------------------------------


def test_strict_context_raises_and_default_left_truncates_only_a_prompt_that_fills_the_context(model, tok, caplog):
    # max_tokens never evicts the prompt (it is capped): tests/test_context_budget.py covers the budget
    prompt = prompt_for(tok, "The quick brown fox jumps over the lazy dog. " * 30)
    assert len(prompt) > 128
    engine = Engine(model, tok)
    with pytest.raises(ContextLengthError) as err:
        engine.add(prompt, SamplingParams(max_tokens=100, strict_context=True))
    assert err.value.limit == 128 and err.value.prompt_tokens == len(prompt)
    logging.getLogger("nanochat").addHandler(caplog.handler)
    try:
        done = engine.generate_batch(prompt, SamplingParams(max_tokens=100, temperature=0))[0]
    finally:
        logging.getLogger("nanochat").removeHandler(caplog.handler)
    assert done.prompt_tokens == 128 - 128 // 4  # BOS + tail, room for min(max_tokens, context / 4)
    assert "does not fit the context" in caplog.text


def test_requests_the_engine_cannot_hold_are_rejected_and_the_queue_itself_is_unbounded(model, tok):
    engine = Engine(model, tok, max_batch_size=2)
    with pytest.raises(EngineError, match="lower n"):
        engine.add(prompt_for(tok, "hi"), SamplingParams(n=3))
    with pytest.raises(EngineError, match="empty"):
        engine.add([], SamplingParams())
    for _ in range(5):  # the bound on waiting requests is the scheduler's (QueueFull), not the engine's
        engine.add(prompt_for(tok, "hi"), SamplingParams(max_tokens=2))
    assert engine.num_waiting == 5
