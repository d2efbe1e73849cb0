"""Log-probabilities as OpenAI and vLLM report them: the engine's per-token and prompt logprobs
(log_softmax of the raw logits, computed in the step that chose the token or in the prefill), and
their OpenAI shapes over HTTP."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers_engine import prompt_for

from nanochat.engine import Engine, SamplingParams


@pytest.fixture
def model(tiny_model_factory):
    return tiny_model_factory(seed=3)


def test_greedy_chosen_token_logprob_is_the_max_of_its_top_logprobs(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer)
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, use_tools=False)
    events = [e for batch in engine.generate(prompt_for(tiny_tokenizer, "hello world"), params) for e in batch]
    assert events
    for ev in events:
        assert ev.logprob is not None and ev.logprob.token_id == ev.token_id
        assert len(ev.logprob.top) == 5
        assert ev.logprob.top[0][0] == ev.token_id
        assert ev.logprob.logprob == pytest.approx(max(lp for _, lp in ev.logprob.top), abs=1e-6)
        assert [lp for _, lp in ev.logprob.top] == sorted((lp for _, lp in ev.logprob.top), reverse=True)


def test_token_logprobs_equal_log_softmax_of_a_full_forward_before_temperature(model, tiny_tokenizer):
    prompt = prompt_for(tiny_tokenizer, "the cat sat")
    engine = Engine(model, tiny_tokenizer)
    params = SamplingParams(max_tokens=6, temperature=1.7, top_k=3, seed=5, logprobs=2, use_tools=False)
    events = [e for batch in engine.generate(prompt, params) for e in batch]
    ids = prompt + [e.token_id for e in events]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    for i, ev in enumerate(events):
        pos = len(prompt) - 1 + i
        assert ev.logprob.logprob == pytest.approx(ref[pos, ev.token_id].item(), abs=1e-4)
        assert ev.logprob.top[0][1] == pytest.approx(ref[pos].max().item(), abs=1e-4)


def test_echoed_prompt_logprobs_equal_a_direct_forward_pass_across_prefill_chunks(model, tiny_tokenizer):
    prompt = prompt_for(tiny_tokenizer, "def add(a, b):\n    return a + b\n" * 2)
    engine = Engine(model, tiny_tokenizer, prefill_chunk=7)  # several chunks: boundaries must line up
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=3, prompt_logprobs=True)
    engine.generate_many([prompt[:5]], SamplingParams(max_tokens=2, temperature=0.0))  # warm the prefix cache
    first = next(iter(engine.generate(prompt, params)))[0]
    scored = first.prompt_logprobs
    assert scored is not None and len(scored) == len(prompt) - 1
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)
    for i, lp in enumerate(scored):
        assert lp.token_id == prompt[i + 1]
        assert lp.logprob == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[i].topk(3).indices.tolist()


def test_requests_without_logprobs_get_none_in_a_batch_with_one_that_asked(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer)
    a = engine.add(prompt_for(tiny_tokenizer, "hello"), SamplingParams(max_tokens=4, temperature=0.0, logprobs=0))
    b = engine.add(prompt_for(tiny_tokenizer, "world"), SamplingParams(max_tokens=4, temperature=0.0))
    seen = {a: [], b: []}
    while engine.has_work():
        for ev in engine.step():
            seen[ev.seq_id].append(ev)
    assert all(ev.logprob is not None and ev.logprob.top == () and math.isfinite(ev.logprob.logprob) for ev in seen[a])
    assert all(ev.logprob is None and ev.prompt_logprobs is None for ev in seen[b])


@pytest.mark.parametrize("bad", [{"logprobs": -1}, {"logprobs": 21}])
def test_sampling_params_reject_out_of_range_logprobs(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# ---- the serving layer (no HTTP): OpenAI shapes ------------------------------------------------


@pytest.fixture
def serving(tiny_tokenizer, tiny_model_factory):
    """A :class:`Serving` over a real engine and scheduler (no Ray, no HTTP)."""
    from nanochat.config import load_preset
    from nanochat.serve.scheduler import Scheduler
    from nanochat.serve.serving import Serving

    model = tiny_model_factory(seed=0, seq=256)
    scheduler = Scheduler(Engine(model, tiny_tokenizer, max_batch_size=4), 8)
    settings = load_preset("tiny").serve.model_copy(update={"stream_interval_ms": 0.0})
    yield Serving(tiny_tokenizer, scheduler, "tiny-test", 256, settings), model
    scheduler._pool.shutdown(wait=False, cancel_futures=True)


def _run(serving, make):
    import asyncio

    async def go():
        try:
            return await make()
        finally:
            await serving.scheduler.close()

    return asyncio.run(go())


def _sse(chunks: list[str]) -> list[dict]:
    import json

    lines = [line for chunk in chunks for line in chunk.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_echo_with_max_tokens_zero_scores_the_prompt_like_a_forward_pass(serving, tiny_tokenizer):
    from nanochat.serve.openai_types import CompletionRequest

    srv, model = serving
    text = "the quick brown fox"
    body = CompletionRequest.model_validate({"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1})
    out = _run(srv, lambda: srv.completion(body).response())
    choice = out.choices[0]
    ids = [tiny_tokenizer.get_bos_token_id()] + tiny_tokenizer.encode(text)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    lp = choice.logprobs
    assert choice.text == text and out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert list(lp.top_logprobs[i].values()) == [pytest.approx(ref[i - 1].max().item(), abs=1e-4)]
    # offsets index the echoed text (the BOS the server added takes no room in it)
    assert lp.text_offset[1] == 0 and "".join(lp.tokens[1:]) == text
    assert all(text[o:].startswith(t) for o, t in zip(lp.text_offset[1:], lp.tokens[1:]))


def test_completion_logprobs_cover_each_generated_token_streamed_and_whole(serving):
    from nanochat.serve.openai_types import CompletionRequest

    srv, _ = serving
    body = {"prompt": "hello", "max_tokens": 6, "temperature": 0.0, "logprobs": 3}

    async def both():
        whole = await srv.completion(CompletionRequest.model_validate(body)).response()
        chunks = [c async for c in srv.completion(CompletionRequest.model_validate({**body, "stream": True})).stream()]
        return whole, chunks

    whole, chunks = _run(srv, both)
    lp = whole.choices[0].logprobs
    # an end-of-turn token is listed (generated and scored) though not counted as a completion token
    assert len(lp.tokens) - whole.usage.completion_tokens in (0, 1) and lp.tokens
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the best
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    streamed = [c["logprobs"] for e in _sse(chunks) for c in e["choices"] if c.get("logprobs")]
    assert sum((s["tokens"] for s in streamed), []) == lp.tokens
    assert sum((s["token_logprobs"] for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert sum((s["text_offset"] for s in streamed), []) == lp.text_offset


def test_chat_logprobs_streamed_equal_the_whole_response(serving):
    from nanochat.serve.openai_types import ChatCompletionRequest

    srv, _ = serving
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0.0,
            "logprobs": True, "top_logprobs": 2}

    async def both():
        whole = await srv.chat(ChatCompletionRequest.model_validate(body)).response()
        chunks = [c async for c in srv.chat(ChatCompletionRequest.model_validate({**body, "stream": True})).stream()]
        return whole, chunks

    whole, chunks = _run(srv, both)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens > 0
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = [x for e in _sse(chunks) for c in e["choices"] if c.get("logprobs") for x in c["logprobs"]["content"]]
    # two runs (the second may reuse the first's prompt KV): same tokens, values equal up to float noise
    assert [x["token"] for x in streamed] == [x.token for x in content]
    assert [x["logprob"] for x in streamed] == pytest.approx([x.logprob for x in content], abs=1e-4)


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
    {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": -1},
])
def test_invalid_chat_logprobs_are_refused(body):
    from pydantic import ValidationError

    from nanochat.serve.openai_types import ChatCompletionRequest

    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "logprobs": 21}, {"prompt": "hi", "logprobs": -1}, {"prompt": "hi", "max_tokens": 0},
])
def test_invalid_completion_logprobs_are_refused(body):
    from pydantic import ValidationError

    from nanochat.serve.openai_types import CompletionRequest

    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)
