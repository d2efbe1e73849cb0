"""The serving layer without HTTP: a real engine and scheduler, no FastAPI, no Ray, no Serve."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from nanochat.engine import TokenEvent
from nanochat.serve.openai_types import APIError, ChatCompletionRequest, CompletionRequest
from nanochat.serve.scheduler import DONE
from nanochat.serve.serving import merge

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def test_the_serving_layer_imports_without_fastapi_or_ray():
    code = ("import sys, nanochat.serve.serving; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_merge_gives_one_delta_per_choice_and_does_not_count_the_end_of_turn_token():
    counts = [0, 0]
    items = [
        (0, TokenEvent(1, 10, "Hel")), (1, TokenEvent(2, 11, "A")), (0, TokenEvent(1, 12, "lo")),
        (0, TokenEvent(1, 3, "", finished=True, finish_reason="stop", ends_turn=True)),
        (1, TokenEvent(2, 13, "B", finished=True, finish_reason="length")), DONE,
    ]
    batch, end = merge(items, counts, "messages")
    assert batch == [(0, "Hello", "stop"), (1, "AB", "length")] and end
    assert counts == [2, 2]


def test_merge_turns_a_failed_sequence_or_a_refusal_into_the_openai_error():
    failed = TokenEvent(1, -1, "", finished=True, finish_reason="error", error="ValueError: nan")
    with pytest.raises(APIError) as err:
        merge([(0, failed)], [0], "prompt")
    assert (err.value.status, err.value.code) == (500, "engine_error") and "nan" in err.value.message
    from nanochat.engine import ContextLengthError

    with pytest.raises(APIError) as err:
        merge([ContextLengthError(300, 16, 256)], [0], "prompt")
    assert (err.value.status, err.value.param, err.value.code) == (400, "prompt", "context_length_exceeded")


@pytest.fixture
def serving_of(tiny_tokenizer, tiny_model_factory):
    """``serving_of(max_waiting)`` → a :class:`Serving` over a real engine and scheduler (closed after)."""
    from nanochat.config import load_preset
    from nanochat.engine import Engine
    from nanochat.serve.scheduler import Scheduler
    from nanochat.serve.serving import Serving

    model = tiny_model_factory(seed=0, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, seq=256)
    made = []

    def make(max_waiting: int = 8) -> Serving:
        scheduler = Scheduler(Engine(model, tiny_tokenizer, max_batch_size=4), max_waiting)
        made.append(scheduler)
        settings = load_preset("tiny").serve.model_copy(update={"stream_interval_ms": 0.0})
        return Serving(tiny_tokenizer, scheduler, "tiny-test", 256, settings)

    yield make
    for scheduler in made:
        scheduler._pool.shutdown(wait=False, cancel_futures=True)


def _events(chunks: list[str]) -> list[dict]:
    lines = [line for chunk in chunks for line in chunk.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_a_streamed_chat_carries_the_same_reply_and_usage_as_the_whole_object(serving_of):
    serving = serving_of()
    body = {"messages": HELLO, "max_tokens": 12, "seed": 7, "temperature": 1.0, "n": 2}

    async def run():
        whole = await serving.chat(ChatCompletionRequest.model_validate(body)).response()
        stream = serving.chat(ChatCompletionRequest.model_validate(
            {**body, "stream": True, "stream_options": {"include_usage": True}}))
        chunks = [c async for c in stream.stream()]
        await serving.scheduler.close()
        return whole, chunks

    whole, chunks = asyncio.run(run())
    events = _events(chunks)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    for i in range(2):
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[2:-1] if e["choices"][0]["index"] == i)
        reasons = [e["choices"][0]["finish_reason"] for e in events[2:-1] if e["choices"][0]["index"] == i]
        assert text == whole.choices[i].message.content and reasons[-1] == whole.choices[i].finish_reason
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole.usage.model_dump()
    assert whole.usage.completion_tokens <= 2 * 12 and whole.usage.prompt_tokens > 0


def test_a_batch_that_never_fits_is_a_400_and_a_full_queue_a_429(serving_of):
    serving = serving_of(max_waiting=2)

    async def run():
        with pytest.raises(APIError) as never:
            serving.completion(CompletionRequest.model_validate({"prompt": ["a", "b", "c"], "max_tokens": 1}))
        gen = serving.completion(CompletionRequest.model_validate({"prompt": ["a", "b"], "max_tokens": 1}))
        with pytest.raises(APIError) as busy:  # submitted before the scheduler ran: both slots still wait
            serving.completion(CompletionRequest.model_validate({"prompt": "c", "max_tokens": 1}))
        done = await gen.response()
        await serving.scheduler.close()
        return never.value, busy.value, done

    never, busy, done = asyncio.run(run())
    assert (never.status, never.param) == (400, "prompt") and "at most 2" in never.message
    assert (busy.status, busy.code, busy.headers) == (429, "queue_full", {"Retry-After": "1"})
    assert len(done.choices) == 2 and done.usage.completion_tokens <= 2
