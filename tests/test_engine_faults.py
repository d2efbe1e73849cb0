"""Numerical safety of sampling and per-sequence fault isolation in the engine (real tiny GPT, no mocks).

Faults are injected into one sequence of a real running batch (its detokenizer or stop matcher,
the calculator, a model forward hook); the other sequences must produce exactly what they produce
in a run without the fault.
"""

from __future__ import annotations

import pytest
import torch
from _helpers_engine import chain_model, drain, outcome, poison, prompt_for, tool_chain

from nanochat.engine import Engine, EngineError, SamplingParams, sample_token
from nanochat.sampling import GREEDY_BELOW, SamplingError

EXTREME_TEMPERATURES = [1e-40, 1e-8, GREEDY_BELOW, 1e-3, 0.7, 2.0, 100.0, 1e30]


@pytest.mark.parametrize("scale", [1.0, 15.0, 1e30], ids=["unit", "softcap", "huge"])
def test_sampling_is_safe_and_valid_for_every_extreme_admitted_value(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(384, generator=g) * scale
    best = int(logits.argmax())
    for temperature in EXTREME_TEMPERATURES:
        for top_k in (None, 1, 5, 10**6):
            for top_p in (None, 1e-9, 0.5, 1.0):
                for seed in (0, 1, 2**63 - 1):
                    gen = torch.Generator().manual_seed(seed)
                    got = sample_token(logits, temperature, top_k, top_p, gen)
                    assert 0 <= got < logits.numel()
                    if temperature < GREEDY_BELOW or top_k == 1 or top_p == 1e-9:
                        assert got == best, (temperature, top_k, top_p, seed)
                    elif top_k == 5:
                        assert got in set(torch.topk(logits, 5).indices.tolist())


def test_tiny_temperatures_sample_the_argmax():
    logits = torch.tensor([0.0, 3.0, 2.999, -1.0])
    for temperature in (1e-40, 1e-8, 1e-6):
        assert sample_token(logits, temperature, generator=torch.Generator().manual_seed(1)) == 1
    # just above the greedy threshold the draw is still the top token: the runner-up's weight underflows
    draws = {sample_token(logits, 2 * GREEDY_BELOW, generator=torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {1}


def test_nan_logits_never_win_inf_logits_share_the_mass_and_all_nan_raises():
    logits = torch.tensor([float("nan"), 1.0, 0.5, float("nan")])
    draws = {sample_token(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1, 2}
    logits = torch.tensor([float("inf"), 1.0, float("inf"), float("nan")])
    draws = {sample_token(logits, 0.5, top_p=0.9, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {0, 2}
    with pytest.raises(SamplingError, match="no usable logits"):
        sample_token(torch.full((8,), float("nan")), 1.0)
    with pytest.raises(SamplingError):
        sample_token(torch.full((8,), float("-inf")), 1.0)


@pytest.mark.parametrize(
    "bad", [{"temperature": float("inf")}, {"temperature": float("nan")}, {"seed": 2**64}, {"seed": -(2**63) - 1}]
)
def test_sampling_params_reject_non_finite_temperature_and_unseedable_seeds(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_tiny_temperature_generates_the_greedy_text(model, tok):
    prompt = prompt_for(tok, "The quick brown fox")
    greedy = Engine(model, tok).generate_batch(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
    for temperature in (1e-40, 1e-8):
        got = Engine(model, tok).generate_batch(prompt, SamplingParams(max_tokens=12, temperature=temperature, seed=3))
        assert got[0].tokens == greedy.tokens and got[0].finish_reason == greedy.finish_reason


BATCH_TEXTS = ["The quick brown fox", "To be, or not to be", "def add(a, b):", "Numbers 12345", "In the beginning"]
BATCH_PARAMS = [
    SamplingParams(max_tokens=10, temperature=0),
    SamplingParams(max_tokens=10, temperature=0.9, seed=5),
    SamplingParams(max_tokens=10, temperature=1e-40),
    SamplingParams(max_tokens=10, temperature=1.2, top_k=20, top_p=0.9, seed=7, n=2),
    SamplingParams(max_tokens=10, temperature=0),
]


def run_batch(model, tok, faulty: int | None = None, after: int = 0, part: str = "detok"):
    """The same 5 requests (6 samples) in one engine; request ``faulty`` gets an injected fault."""
    engine = Engine(model, tok, max_batch_size=8, prefix_cache=False)
    ids = [engine.add(prompt_for(tok, t), p) for t, p in zip(BATCH_TEXTS, BATCH_PARAMS)]
    if faulty is not None:
        poison(engine, ids[faulty], after=after, part=part)
    got = drain(engine)
    assert engine.num_running == 0 and not engine.has_work()
    return engine, {(ids.index(seq_id), index): outcome(events) for (seq_id, index), events in got.items()}


@pytest.mark.parametrize(
    "faulty,after,part",
    [(1, 0, "detok"), (1, 4, "detok"), (3, 2, "stopper"), (0, 3, "stopper")],
    ids=["first-token", "mid-run", "n2-stop-matcher", "greedy-row-stop-matcher"],
)
def test_a_fault_in_one_sequence_fails_only_that_sequence(model, tok, faulty, after, part):
    _, clean = run_batch(model, tok)
    engine, got = run_batch(model, tok, faulty, after, part)
    assert set(got) == set(clean)
    for key, result in got.items():
        if key[0] == faulty:
            assert result.finish_reason == "error" and "InjectedFault" in result.error
            assert result.steps[-1] == (-1, "")
            assert result.steps[:-1] == clean[key].steps[:after]  # what it streamed before the fault
        else:
            assert result == clean[key], key  # the others are exactly the run without the fault
    assert engine.seq_errors == BATCH_PARAMS[faulty].n and engine.forward_failures == 0
    again = engine.generate_batch(prompt_for(tok, "The"), SamplingParams(max_tokens=4, temperature=0))[0]
    assert again.finish_reason in ("stop", "length") and again.error is None


def test_nan_logits_in_one_row_fail_only_that_row(model, tok):
    _, clean = run_batch(model, tok)
    engine = Engine(model, tok, max_batch_size=8, prefix_cache=False)
    ids = [engine.add(prompt_for(tok, t), p) for t, p in zip(BATCH_TEXTS, BATCH_PARAMS)]
    events: dict = {}
    for e in engine.step():  # prefill and first token of every request
        events.setdefault((e.seq_id, e.index), []).append(e)
    assert engine.num_running == 6
    target = ids[1]  # the seeded temperature-0.9 request

    def nan_row(_module, _inputs, logits):
        rows = [i for i, s in enumerate(engine._slots) if s.seq_id == target]
        if logits.shape[0] == len(engine._slots) and rows:
            logits = logits.clone()
            logits[rows] = float("nan")
            return logits

    hook = model.lm_head.register_forward_hook(nan_row)
    try:
        for key, evs in drain(engine).items():
            events.setdefault(key, []).extend(evs)
    finally:
        hook.remove()
    got = {(ids.index(s), i): outcome(evs) for (s, i), evs in events.items()}
    assert got[(1, 0)].finish_reason == "error" and "no usable logits" in got[(1, 0)].error
    assert all(got[k] == clean[k] for k in got if k[0] != 1)


def test_a_failed_decode_forward_fails_its_rows_and_queued_requests_still_run(model, tok):
    engine = Engine(model, tok, max_batch_size=2, prefix_cache=False)
    params = SamplingParams(max_tokens=8, temperature=0)
    running = [engine.add(prompt_for(tok, t), params) for t in BATCH_TEXTS[:2]]
    engine.step()
    queued = engine.add(prompt_for(tok, BATCH_TEXTS[2]), params)  # no free slot: waits
    alone = Engine(model, tok).generate_batch(prompt_for(tok, BATCH_TEXTS[2]), params)[0]

    def boom(_module, inputs):
        if inputs[0].shape == (2, 1):  # the batched decode of the two running rows
            raise RuntimeError("injected forward fault")

    hook = model.register_forward_pre_hook(boom)
    try:
        events = engine.step()
    finally:
        hook.remove()
    assert {e.seq_id for e in events} >= set(running)
    assert all(e.finish_reason == "error" and "injected forward fault" in e.error for e in events
               if e.seq_id in running)
    assert engine.forward_failures == 1 and "decode forward failed" in engine.last_error
    rest = drain(engine)
    steps = [e for (s, _), evs in rest.items() if s == queued for e in evs]
    steps = [e for e in events if e.seq_id == queued] + steps
    assert [e.token_id for e in steps if not e.ends_turn] == alone.tokens


def test_a_failed_prefill_fails_only_its_request(model, tok):
    engine = Engine(model, tok, max_batch_size=4, prefix_cache=False)
    params = SamplingParams(max_tokens=6, temperature=0)
    first = engine.add(prompt_for(tok, BATCH_TEXTS[0]), params)
    engine.step()
    bad_prompt = prompt_for(tok, "The quick brown fox jumps over the lazy dog.")
    bad = engine.add(bad_prompt, SamplingParams(max_tokens=6, temperature=0, n=2))

    def boom(_module, inputs):
        if inputs[0].shape[1] > 1:  # a prefill chunk
            raise RuntimeError("injected prefill fault")

    hook = model.register_forward_pre_hook(boom)
    try:
        got = drain(engine)
    finally:
        hook.remove()
    assert [outcome(got[(bad, i)]).finish_reason for i in range(2)] == ["error", "error"]
    assert outcome(got[(first, 0)]).finish_reason in ("stop", "length")
    assert engine.forward_failures == 1 and engine.num_waiting == 0 and engine.prompt_tokens(bad) is None


def test_out_of_range_prompt_token_ids_are_refused_at_add(model, tok):
    engine = Engine(model, tok)
    with pytest.raises(EngineError, match="out of range"):
        engine.add([tok.get_bos_token_id(), tok.vocab_size + 5])
    with pytest.raises(EngineError, match="out of range"):
        engine.add([-1])
    assert not engine.has_work()


def test_tool_failure_fails_only_the_sequence_that_ran_the_tool(tiny_model_factory, tok, monkeypatch):
    import nanochat.engine_seq as engine_module

    prompt = prompt_for(tok, "hi")
    chain = tool_chain(tok, prompt, "7*6")
    m = chain_model(tiny_model_factory, chain)

    def broken_calculator(expr):
        raise ZeroDivisionError(f"injected calculator fault on {expr!r}")

    monkeypatch.setattr(engine_module, "use_calculator", broken_calculator)
    engine = Engine(m, tok)
    with_tool = engine.add(prompt, SamplingParams(max_tokens=30, temperature=0))
    without = engine.add(prompt, SamplingParams(max_tokens=30, temperature=0, use_tools=False))
    got = drain(engine)
    assert outcome(got[(with_tool, 0)]).finish_reason == "error"
    assert "injected calculator fault on '7*6'" in outcome(got[(with_tool, 0)]).error
    plain = outcome(got[(without, 0)])
    assert plain.finish_reason == "stop" and [t for t, _ in plain.steps] == chain[1:]
