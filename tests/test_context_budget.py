"""A generation budget never evicts the prompt: engine, evals, the train loop's samples and the server.

``max_tokens`` is an upper bound capped to the room the prompt leaves; only a prompt that alone
fills the context is shortened (BOS + tail, with a warning) or refused (strict). The CLI's turn
dropping is tested in tests/test_cli_chat.py.
"""

from __future__ import annotations

import logging

import pytest

from nanochat.engine import ContextLengthError, Engine, SamplingParams, answer_room

SEQ = 128  # the context of conftest's `model`


def prompt_of(tok, length: int) -> list[int]:
    """BOS + exactly ``length - 1`` real text tokens."""
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)
    assert len(ids) >= length
    return [tok.get_bos_token_id(), *ids[: length - 1]]


@pytest.fixture
def warnings_seen(caplog):
    logging.getLogger("nanochat").addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="nanochat.engine")
    yield caplog
    logging.getLogger("nanochat").removeHandler(caplog.handler)


def test_max_tokens_beyond_the_room_is_capped_and_the_whole_prompt_is_kept(model, tok, warnings_seen):
    prompt = prompt_of(tok, 100)
    engine = Engine(model, tok, prefix_cache=False)
    done = engine.generate_batch(prompt, SamplingParams(max_tokens=256, temperature=0))[0]
    assert done.prompt_tokens == 100  # the old engine kept 1 prompt token here
    assert len(done.tokens) <= SEQ - 100
    exact = engine.generate_batch(prompt, SamplingParams(max_tokens=SEQ - 100, temperature=0))[0]
    assert (done.tokens, done.text, done.finish_reason) == (exact.tokens, exact.text, exact.finish_reason)
    assert "does not fit" not in warnings_seen.text


def test_the_capped_budget_is_what_admission_reserves(model, tok):
    engine = Engine(model, tok, max_batch_size=2, prefix_cache=False)
    seq_id = engine.add(prompt_of(tok, 100), SamplingParams(max_tokens=10_000, temperature=0))
    assert engine._live[seq_id].params.max_tokens == SEQ - 100
    engine.step()
    assert engine._reserved_tokens() == SEQ  # prompt + capped budget, not prompt + 10 000
    engine.cancel(seq_id)


def test_strict_mode_caps_the_budget_and_refuses_only_a_prompt_that_fills_the_context(model, tok):
    engine = Engine(model, tok, prefix_cache=False)
    done = engine.generate_batch(prompt_of(tok, 100), SamplingParams(max_tokens=256, strict_context=True))[0]
    assert done.prompt_tokens == 100 and len(done.tokens) <= SEQ - 100
    assert engine.generate_batch(prompt_of(tok, SEQ - 1), SamplingParams(strict_context=True, temperature=0))[0].tokens
    with pytest.raises(ContextLengthError) as err:
        engine.add(prompt_of(tok, SEQ), SamplingParams(max_tokens=16, strict_context=True))
    assert (err.value.prompt_tokens, err.value.limit) == (SEQ, SEQ)
    assert f"at most {SEQ - 16} tokens" in str(err.value)


def test_a_prompt_longer_than_the_context_keeps_bos_and_its_tail_with_a_warning(model, tok, warnings_seen):
    prompt = prompt_of(tok, 200)
    engine = Engine(model, tok, prefix_cache=False)
    seq_id = engine.add(prompt, SamplingParams(max_tokens=10, temperature=0))
    kept = engine._live[seq_id].prompt
    assert answer_room(10, SEQ) == 10 and answer_room(500, SEQ) == SEQ // 4 and answer_room(1, 2) == 1
    assert len(kept) == SEQ - 10
    assert kept == [tok.get_bos_token_id(), *prompt[200 - (SEQ - 11) :]]
    assert engine._live[seq_id].params.max_tokens == 10
    assert "the prompt of 200 tokens does not fit the context of 128" in warnings_seen.text
    engine.cancel(seq_id)


def test_chat_eval_generation_keeps_the_whole_problem_when_max_new_tokens_exceeds_the_room(
    tiny_model_factory, tok, warnings_seen
):
    from nanochat.eval.chat_eval import generative_shard, load_task

    conv = load_task("GSM8K")[0]
    prompt = tok.render_for_completion(conv)
    model = tiny_model_factory(seed=0, n_layer=2, n_embd=64, seq=len(prompt) + 24)
    payload = {"task": "GSM8K", "max_new_tokens": 512, "temperature": 0.0, "num_samples": 1}
    record = generative_shard(model, tok, payload, [0])[0]
    expected = Engine(model, tok).generate_batch(prompt, SamplingParams(max_tokens=24, temperature=0.0))[0].text
    assert record["completions"] == [expected]
    assert "does not fit" not in warnings_seen.text


def test_train_loop_greedy_samples_continue_the_whole_prompt(tiny_model_factory, tok):
    from nanochat.train.loop import greedy_samples

    model = tiny_model_factory(seed=0, n_layer=2, n_embd=64, seq=SEQ)
    text = tok.decode(prompt_of(tok, 100)[1:])
    [sample] = greedy_samples(model, tok, [text], "cpu", max_tokens=64)
    ids = tok.encode(text, prepend=tok.get_bos_token_id())
    room = SEQ - len(ids)
    assert room < 64
    expected = Engine(model, tok).generate_batch(ids, SamplingParams(max_tokens=room, temperature=0.0))[0].text
    assert sample == text + expected


def _server_stub(engine: Engine, context_len: int, max_new_tokens: int):
    """The replica's serving layer (no Serve, no HTTP), with the real serve settings of the tiny preset."""
    from nanochat.config import load_preset
    from nanochat.serve.scheduler import Scheduler
    from nanochat.serve.serving import Serving

    settings = load_preset("tiny").serve.model_copy(update={"max_new_tokens": max_new_tokens, "temperature": 0.0})
    return Serving(engine.tokenizer, Scheduler(engine), "tiny", context_len, settings)


def test_server_default_budget_is_capped_to_the_room_and_runs_on_the_whole_prompt(model, tok):
    """The server's request → SamplingParams step, then the engine as the replica runs it (no Serve)."""
    from nanochat.serve.messages import render_prompt
    from nanochat.serve.openai_types import APIError, ChatCompletionRequest

    engine = Engine(model, tok, prefix_cache=False)
    stub = _server_stub(engine, SEQ, max_new_tokens=256)
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 2}]}
    )
    prompt = render_prompt(tok, body.messages)
    params = stub.sampling_params(body, len(prompt), stub.settings.max_new_tokens)
    assert params.max_tokens == SEQ - len(prompt) and params.strict_context
    done = engine.generate_batch(prompt, params)[0]
    assert done.prompt_tokens == len(prompt) and len(done.tokens) <= SEQ - len(prompt)

    too_long = ChatCompletionRequest.model_validate({**body.model_dump(exclude_none=True), "max_tokens": SEQ})
    with pytest.raises(APIError) as err:  # an explicit budget beyond the room is the client's error
        stub.sampling_params(too_long, len(prompt), 256)
    assert (err.value.status, err.value.code) == (400, "context_length_exceeded")
