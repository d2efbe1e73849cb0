"""The Serve app over real HTTP on a tiny real checkpoint, with the real ``openai`` client.

One module-scoped Serve instance holds three applications: ``main`` at ``/`` (no API key),
``keyed`` at ``/keyed`` (API key, batch of 1, one waiting request: for 401 and 429) and ``faulty``
at ``/faulty`` (a checkpoint whose ``<|assistant_end|>`` embedding is NaN: a prompt holding that
token makes its own sequence fail in the engine, a real per-sequence fault; the model never feeds
that token back itself, since generating it ends the turn). The request fuzzer, the UI browser test
and the locust run are here too so they share the same apps.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _helpers_serve import (  # noqa: E402
    FUZZ_CHAT,
    FUZZ_COMPLETION,
    build_tiny_checkpoint,
    free_port,
    fuzz_cases,
    wait_healthy,
)

openai = pytest.importorskip("openai")

MODEL = "tiny-serve"
API_KEY = "sk-test-123"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, tiny_tokenizer, tiny_model_factory):
    from ray import serve

    from nanochat.serve.app import build_app

    root = tmp_path_factory.mktemp("serve_base")
    ckpt = build_tiny_checkpoint(root, tiny_tokenizer, tiny_model_factory, tag=MODEL)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # compile=false: serve.compile=auto would compile and time the decode step at every replica start
    # on CPU (seconds warm, minutes cold), which the suite's time budget cannot pay (docs/engine.md).
    serve.run(build_app({"checkpoint": str(ckpt), "overrides": ["compile=false"]}), name="main", route_prefix="/",
              blocking=False)
    keyed = build_app(
        {"checkpoint": str(ckpt), "api_key": API_KEY,
         "overrides": ["max_batch_size=1", "max_waiting=1", "max_new_tokens=120", "cpu_threads=2", "compile=false"]}
    )
    serve.run(keyed, name="keyed", route_prefix="/keyed", blocking=False)
    faulty = _faulty_checkpoint(tmp_path_factory.mktemp("serve_faulty"), tiny_tokenizer, tiny_model_factory)
    serve.run(build_app({"checkpoint": str(faulty), "overrides": ["max_batch_size=4", "compile=false"]}), name="faulty",
              route_prefix="/faulty", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(f"{base}/health")
    wait_healthy(f"{base}/keyed/health")
    wait_healthy(f"{base}/faulty/health")
    yield {"base": base, "checkpoint": ckpt, "tokenizer": tiny_tokenizer}
    serve.shutdown()


def _faulty_checkpoint(root: Path, tokenizer, model_factory) -> Path:
    import torch

    from nanochat.checkpoint import save_checkpoint

    model = model_factory(seed=0, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, seq=512)
    with torch.no_grad():
        model.transformer.wte.weight[tokenizer.encode_special("<|assistant_end|>")] = float("nan")
    directory = root / "checkpoints" / "sft" / "tiny-faulty" / "step_000001"
    return save_checkpoint(directory, model, model.config, tokenizer, stage="sft", step=1)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", HELLO)
    return client.chat.completions.create(**kw)


def _long_seed(client, max_tokens: int = 60) -> int:
    """A seed whose reply runs to max_tokens (the random tiny model sometimes stops early)."""
    for seed in range(50):
        r = _chat(client, max_tokens=max_tokens, seed=seed, temperature=1.0)
        if r.choices[0].finish_reason == "length":
            return seed
    pytest.fail("no seed in 0..49 generated max_tokens tokens")


# ---- chat completions ----------------------------------------------------------------------------


def test_chat_completion_returns_openai_object_with_usage_matching_tokenizer(server, client):
    r = _chat(client, max_tokens=8, seed=3)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt = server["tokenizer"].render_for_completion({"messages": HELLO})
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_served_reply_equals_direct_engine_generation_and_usage_counts_its_tokens(server, client):
    from nanochat.checkpoint import load_checkpoint
    from nanochat.engine import Engine, SamplingParams

    r = _chat(client, max_tokens=20, seed=11, temperature=0.9, top_p=0.95)
    ckpt = load_checkpoint(server["checkpoint"])
    engine = Engine(ckpt.model, ckpt.tokenizer, prefix_cache=False)
    prompt = ckpt.tokenizer.render_for_completion({"messages": HELLO})
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=11)  # server: tools on
    [direct] = engine.generate_batch(prompt, params)
    assert r.choices[0].message.content == direct.text
    assert r.usage.completion_tokens == len(direct.tokens)
    assert r.choices[0].finish_reason == direct.finish_reason


def test_max_tokens_and_max_completion_tokens_end_with_length(client):
    seed = _long_seed(client, max_tokens=30)
    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = _chat(client, seed=seed, temperature=1.0, **kw)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5


def test_same_seed_gives_same_reply_and_different_seeds_differ(client):
    a = _chat(client, max_tokens=24, seed=7, temperature=1.0).choices[0].message.content
    b = _chat(client, max_tokens=24, seed=7, temperature=1.0).choices[0].message.content
    c = _chat(client, max_tokens=24, seed=8, temperature=1.0).choices[0].message.content
    assert a == b
    assert a != c


def test_n_returns_n_independent_choices(client):
    r = _chat(client, max_tokens=12, seed=5, n=3, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1


def test_usage_counts_the_prompt_once_and_sums_completion_tokens_over_choices(server, client):
    from nanochat.checkpoint import load_checkpoint
    from nanochat.engine import Engine, SamplingParams

    tok = server["tokenizer"]
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    prompt = tok.render_for_completion({"messages": messages})
    one = _chat(client, messages=messages, max_tokens=5, seed=1, temperature=1.0)
    three = _chat(client, messages=messages, max_tokens=5, seed=1, temperature=1.0, n=3)
    assert one.usage.prompt_tokens == three.usage.prompt_tokens == len(prompt)  # was 3x with n=3
    ckpt = load_checkpoint(server["checkpoint"])
    direct = Engine(ckpt.model, ckpt.tokenizer, prefix_cache=False).generate_batch(
        prompt, SamplingParams(max_tokens=5, temperature=1.0, top_k=50, seed=1, n=3)
    )
    assert three.usage.completion_tokens == sum(len(c.tokens) for c in direct)
    assert three.usage.total_tokens == len(prompt) + three.usage.completion_tokens
    # completions: each prompt counted once, streamed usage too
    prompts = ["The quick", "In the beginning"]
    expected = sum(1 + len(tok.encode(p)) for p in prompts)  # bos + text
    for n in (1, 2):
        r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=n, seed=2)
        assert r.usage.prompt_tokens == expected and len(r.choices) == 2 * n
        chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=n, seed=2, stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens == expected
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_string_cuts_the_reply_before_it(client):
    seed = _long_seed(client, max_tokens=40)
    full = _chat(client, max_tokens=40, seed=seed, temperature=1.0).choices[0].message.content
    candidates = [full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].isprintable() and "\ufffd" not in full[i : i + 2]]
    assert candidates, f"no printable stop candidate in {full!r}"
    stop = candidates[0]
    r = _chat(client, max_tokens=40, seed=seed, temperature=1.0, stop=[stop, "@@never@@"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.find(stop)]


def test_streaming_sends_role_first_then_deltas_finish_reason_usage_and_done(server, client):
    seed = 4
    plain = _chat(client, max_tokens=16, seed=seed, temperature=1.0)
    chunks = list(
        _chat(client, max_tokens=16, seed=seed, temperature=1.0, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # raw SSE: every event is a data line, the last one is [DONE]
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])  # not asked for: left out


def _sse_events(base: str, path: str, body: dict) -> list:
    with httpx.stream("POST", base + path, json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streamed_objects_leave_out_unset_fields_as_openai_does(server):
    base = server["base"]
    events = _sse_events(base, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 6, "seed": 4, "n": 2, "stream": True})
    deltas = [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events]
    for e in events:
        assert set(e) == {"id", "object", "created", "model", "choices"}  # no usage unless asked for
        assert set(e["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
        assert e["choices"][0]["logprobs"] is None
    for i in (0, 1):
        mine = [(d, r) for c, d, r in deltas if c == i]
        assert mine[0] == ({"role": "assistant", "content": ""}, None)  # the role once, first
        assert all(set(d) == {"content"} and d["content"] and r is None for d, r in mine[1:-1])
        assert mine[-1][0] == {} and mine[-1][1] in ("stop", "length")  # the finish: an empty delta
    events = _sse_events(base, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3, "stream": True,
                                                        "stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["completion_tokens"] >= 1
    events = _sse_events(base, "/v1/completions", {"prompt": "def add", "max_tokens": 3, "stream": True})
    assert all(set(e) == {"id", "object", "created", "model", "choices"} for e in events)
    assert all(set(e["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} for e in events)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}, timeout=30).json()
    assert r["choices"][0]["message"] == {"role": "assistant", "content": r["choices"][0]["message"]["content"],
                                          "refusal": None}
    assert r["choices"][0]["logprobs"] is None and set(r["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_text_parts_and_system_message_are_accepted(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
    ]
    r = _chat(client, messages=messages, max_tokens=4, seed=1, user="alice")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_text_completions_accept_string_and_list_prompts(client):
    r = client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=6, seed=2)
    assert r.object == "text_completion" and len(r.choices) == 1
    r = client.completions.create(model=MODEL, prompt=["The quick", "In the beginning"], max_tokens=4, n=2, seed=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    chunks = list(client.completions.create(model=MODEL, prompt="def add", max_tokens=4, stream=True, seed=2))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


# ---- errors ----------------------------------------------------------------------------------------

OK = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
ERROR_CASES = [
    # (body, status, param, code)
    ({**OK, "messages": []}, 400, "messages", "invalid_value"),
    ({**OK, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages.0.content.0.type", "invalid_value"),
    ({**OK, "messages": [{"role": "user"}]}, 400, "messages.0.content", "missing_required_parameter"),
    ({**OK, "messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "messages.0.extra", "unknown_parameter"),
    ({**OK, "messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "1"}]}, 400,
     "messages.1.tool_call_id", "invalid_messages"),
    ({**OK, "messages": "hello"}, 400, "messages", "invalid_value"),
    ({"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ({**OK, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({**OK, "temperature": -1}, 400, "temperature", "invalid_value"),
    ({**OK, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({**OK, "n": 0}, 400, "n", "invalid_value"),
    ({**OK, "n": 50}, 400, "n", "invalid_value"),
    ({**OK, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({**OK, "max_tokens": "many"}, 400, "max_tokens", "invalid_value"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({**OK, "stream_options": {"include_usage": True}}, 400, None, "invalid_value"),
    ({**OK, "max_tokens": 4, "max_completion_tokens": 5}, 400, None, "invalid_value"),
    ({**OK, "frobnicate": 1}, 400, "frobnicate", "unknown_parameter"),
    ({**OK, "logit_bias": {"10": 5}}, 400, "logit_bias", "unsupported_parameter"),
    ({**OK, "top_logprobs": 2}, 400, None, "invalid_value"),  # top_logprobs needs logprobs: true
    ({**OK, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ({**OK, "echo": True}, 400, "echo", "unknown_parameter"),  # echo is a completions field
    ({**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ({**OK, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter"),
    ({**OK, "presence_penalty": 1.0}, 400, "presence_penalty", "unsupported_parameter"),
    ({**OK, "max_tokens": 10_000}, 400, "messages", "context_length_exceeded"),
    ({**OK, "messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": None}, 400, "messages", "context_length_exceeded"),
    ({**OK, "model": "gpt-4"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("body,status,param,code", ERROR_CASES, ids=[str(i) for i in range(len(ERROR_CASES))])
def test_bad_chat_requests_get_openai_shaped_4xx(server, body, status, param, code):
    r = httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and (err["param"] is None or isinstance(err["param"], str))
    assert err["code"] is None or isinstance(err["code"], str)
    return err


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("raw", [
    b"", b"{nope", b"[]", b"null", b'"text"',
    b'{"model": "\\ud800", "messages": [], "prompt": "x"}',  # a lone surrogate (was a plain-text 500)
    b'{"model": "\\udfff"}', b'{"user": "\xff\xfe"}', b'{"stop": "\xed\xa0\x80"}',  # invalid UTF-8
    b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deep nesting
], ids=["empty", "truncated", "array", "null", "string", "surrogate", "low-surrogate", "bad-utf8", "cesu", "deep"])
def test_malformed_or_non_unicode_bodies_get_invalid_json_400(server, route, raw):
    r = httpx.post(server["base"] + route, content=raw, timeout=30, headers={"content-type": "application/json"})
    err = _assert_openai_error(r, 400)
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_json", None), err
    assert "None" not in err["message"]


def test_malformed_json_and_unknown_routes_are_openai_shaped(server):
    r = httpx.post(server["base"] + "/v1/chat/completions", content=b"{nope", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server["base"] + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        _chat(client, model="nope")
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, max_tokens=100_000)
    assert info.value.code == "context_length_exceeded"


# ---- messages: what OpenAI accepts is accepted (the table in docs/api.md) ----------------------------

from test_serve_messages import ACCEPTED, REJECTED  # noqa: E402  (the same rows as the unit tests)


@pytest.mark.parametrize("name,messages,conversation,open_turn", ACCEPTED, ids=[row[0] for row in ACCEPTED])
def test_messages_openai_accepts_are_served_and_rendered_as_nanochat_turns(server, name, messages, conversation, open_turn):
    tok = server["tokenizer"]
    if open_turn:
        ids, _ = tok.render_conversation({"messages": conversation}, max_tokens=1 << 30, allow_empty=True)
        expected = len(ids) - 1  # the last assistant turn stays open: the reply continues it
    else:
        expected = len(tok.render_for_completion({"messages": conversation}, allow_empty=True))
    r = httpx.post(server["base"] + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == expected


@pytest.mark.parametrize("messages,param,code", REJECTED, ids=[str(i) for i in range(len(REJECTED))])
def test_messages_openai_rejects_get_a_400_naming_the_field(server, messages, param, code):
    r = httpx.post(server["base"] + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=30)
    err = _assert_openai_error(r, 400)
    assert (err["param"], err["code"]) == (param, code), err


# ---- limits: a request that can never be admitted is a 400, not a 429 ---------------------------------


def test_a_batch_larger_than_the_server_ever_admits_is_a_400_naming_the_limit(server):
    limit = httpx.get(server["base"] + "/stats", timeout=10).json()["max_waiting"]
    body = {"model": MODEL, "prompt": ["a"] * (limit + 1), "max_tokens": 1}
    err = _assert_openai_error(httpx.post(server["base"] + "/v1/completions", json=body, timeout=30), 400)
    assert err["param"] == "prompt" and str(limit) in err["message"]
    r = httpx.post(server["base"] + "/v1/completions", json={**body, "prompt": ["a"] * limit}, timeout=120)
    assert r.status_code == 200 and len(r.json()["choices"]) == limit  # the limit itself fits an idle server


# ---- auth comes first ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{nope", b'{"x": 1}', b'{"model": "\\ud800"}', json.dumps(OK).encode()])
def test_api_key_is_checked_before_the_body_on_every_closed_route(server, raw):
    base = server["base"] + "/keyed"
    for path in ("/v1/chat/completions", "/v1/completions", "/cache/invalidate"):
        r = httpx.post(base + path, content=raw, timeout=10, headers={"content-type": "application/json"})
        assert _assert_openai_error(r, 401)["code"] == "invalid_api_key", path
    for path in ("/v1/models", "/v1/models/nope"):
        assert _assert_openai_error(httpx.get(base + path, timeout=10), 401)["code"] == "invalid_api_key", path
    for path in ("/health", "/stats", "/", "/openapi.json", "/docs"):  # the open routes docs/api.md lists
        assert httpx.get(base + path, timeout=10).status_code == 200, path
    schema = httpx.get(base + "/openapi.json", timeout=10).json()
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


# ---- engine faults stay with their request -------------------------------------------------------------


def _run_all(fns: list) -> list:
    results: list = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as err:  # reported by the assertion below, with the others' results
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_an_engine_fault_fails_only_its_own_request_with_an_openai_error(server):
    base = server["base"] + "/faulty"
    tok = server["tokenizer"]
    bos = tok.get_bos_token_id()
    poison = [bos, tok.encode_special("<|assistant_end|>"), *tok.encode("x")]
    bad = {"prompt": poison, "max_tokens": 8, "temperature": 1.0, "seed": 1}
    good = {"messages": HELLO, "max_tokens": 40, "temperature": 1.0}
    calls = [
        lambda: httpx.post(base + "/v1/completions", json=bad, timeout=120),
        lambda: httpx.post(base + "/v1/completions", json={**bad, "stream": True}, timeout=120),
        *[lambda i=i: _sse_events(base, "/v1/chat/completions", {**good, "seed": i, "stream": True}) for i in range(3)],
        *[lambda i=i: httpx.post(base + "/v1/chat/completions", json={**good, "seed": 10 + i}, timeout=120) for i in range(2)],
    ]
    plain_bad, stream_bad, *rest = _run_all(calls)
    for r in (plain_bad, stream_bad):  # failed before any output: an HTTP error, as OpenAI does
        err = _assert_openai_error(r, 500)
        assert (err["type"], err["code"]) == ("server_error", "engine_error") and "generation failed" in err["message"]
    for events in rest[:3]:
        assert not isinstance(events, BaseException), events
        assert not any("error" in e for e in events) and any(e["choices"] and e["choices"][0]["finish_reason"] for e in events)
    for r in rest[3:]:
        assert r.status_code == 200, r.text
    # failing after output was sent: the stream ends with an error event, then [DONE]. With n = the batch
    # size (4), the poisoned second prompt starts only once the first prompt's 4 choices are done.
    body = {"prompt": [[bos, *tok.encode("The quick")], poison], "n": 4, "max_tokens": 4, "temperature": 1.0,
            "seed": 3, "stream": True}
    events = _sse_events(base, "/v1/completions", body)
    assert events[:-1] and all(e["choices"][0]["index"] < 4 for e in events[:-1])  # the first prompt's output
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "engine_error"
    faulty = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIError, match="generation failed"):  # the client raises the error event
        list(faulty.completions.create(model="tiny-faulty", **body))
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    assert httpx.get(base + "/stats", timeout=10).json()["seq_errors"] >= 2


def test_a_tiny_temperature_among_twelve_requests_in_flight_fails_nobody(server):
    base = server["base"]
    health: list[int] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            health.append(httpx.get(base + "/health", timeout=10).status_code)
            time.sleep(0.05)

    def chat(i: int, stream: bool, **kw):
        body = {"messages": HELLO, "max_tokens": 30, "seed": i, "temperature": 1.0, **kw}
        if stream:
            events = _sse_events(base, "/v1/chat/completions", {**body, "stream": True})  # asserts [DONE]
            assert not any("error" in e for e in events)
            return 200
        return httpx.post(base + "/v1/chat/completions", json=body, timeout=120).status_code

    calls = [lambda i=i: chat(i, stream=i % 2 == 0) for i in range(11)]
    calls.append(lambda: chat(99, stream=True, temperature=1e-40))  # once failed the whole batch
    poller = threading.Thread(target=poll)
    poller.start()
    results = _run_all(calls)
    stop.set()
    poller.join()
    assert results == [200] * 12, results
    assert health and set(health) == {200}


# ---- client disconnects are normal ---------------------------------------------------------------------


def test_client_disconnects_are_counted_and_not_logged_as_errors(server, client):
    import ray

    params = {"max_tokens": 400, "temperature": 0.0}
    if _chat(client, **params).choices[0].finish_reason != "length":
        params = {"max_tokens": 400, "temperature": 1.0, "seed": _long_seed(client, max_tokens=400)}
    stats = lambda: httpx.get(server["base"] + "/stats", timeout=10).json()  # noqa: E731
    before = stats()["disconnects"]
    body = {"model": MODEL, "messages": HELLO, **params}
    for _ in range(2):  # streams: hang up after the first content delta
        with httpx.stream("POST", server["base"] + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
    # not streamed: hang up while the reply is being generated
    host, port = server["base"].removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        deadline = time.monotonic() + 30
        while stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    deadline = time.monotonic() + 30
    while stats()["disconnects"] < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats()["disconnects"] == before + 3
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".err", ".out", ".log"):
            text = path.read_text(errors="replace")
            assert "unhandled error" not in text, f"{path}: {text[text.find('unhandled error') - 300:][:1500]}"


# ---- fuzzing: no body of any shape gets a 5xx ---------------------------------------------------------


def test_fuzzed_bodies_never_get_a_5xx_and_every_error_is_openai_shaped(server):
    from nanochat.serve.openai_types import ChatCompletionRequest, CompletionRequest

    rng = random.Random(1234)
    cases = (fuzz_cases("/v1/chat/completions", {"model": MODEL, **FUZZ_CHAT}, ChatCompletionRequest, rng)
             + fuzz_cases("/v1/completions", {"model": MODEL, **FUZZ_COMPLETION}, CompletionRequest, rng))
    seen: dict[int, int] = {}
    with httpx.Client(base_url=server["base"], timeout=120, headers={"content-type": "application/json"}) as http:
        for route, raw in cases:
            with http.stream("POST", route, content=raw) as r:
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                body = r.read()
                case = f"{route} {raw[:300]!r} -> {r.status_code} {body[:300]!r}"
                assert r.status_code < 500, case
                if r.status_code != 200:
                    _assert_openai_error(httpx.Response(r.status_code, headers=r.headers, content=body), r.status_code)
                elif r.headers["content-type"].startswith("text/event-stream"):
                    lines = [line for line in body.decode().split("\n") if line]
                    assert lines[-1] == "data: [DONE]" and '"error"' not in body.decode(), case
                else:
                    assert json.loads(body)["choices"], case
    assert len(cases) > 500 and seen.get(200, 0) > 10 and seen.get(400, 0) > 400, seen
    assert httpx.get(server["base"] + "/health", timeout=10).status_code == 200


# ---- models, health, stats, cache ------------------------------------------------------------------


def test_models_lists_the_checkpoint_tag(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(server["base"] + "/v1/models/other", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_health_and_ui_are_served(server):
    h = httpx.get(server["base"] + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == MODEL
    ui = httpx.get(server["base"] + "/", timeout=10)
    assert ui.status_code == 200 and "/v1/chat/completions" in ui.text and "nanochat" in ui.text


def test_cpu_replica_threads_follow_ray_unless_cpu_threads_is_set(server):
    # Ray sizes a 1-CPU actor's thread pool to 1 (the faster choice on 2 cores); serve.cpu_threads overrides it.
    main = httpx.get(server["base"] + "/stats", timeout=10).json()
    keyed = httpx.get(server["base"] + "/keyed/stats", timeout=10).json()
    assert main["torch_threads"] == 1
    assert keyed["torch_threads"] == 2
    assert main["decode_compiled"] is False  # the fixture sets serve.compile=false


def test_multi_turn_history_hits_the_prefix_cache_and_invalidate_drops_it(server, client):
    turn1 = _chat(client, max_tokens=6, seed=1)
    history = HELLO + [{"role": "assistant", "content": turn1.choices[0].message.content or "ok"}]
    before = httpx.get(server["base"] + "/stats", timeout=10).json()["prefix_cache"]
    _chat(client, messages=history + [{"role": "user", "content": "Tell me more."}], max_tokens=6, seed=1)
    after = httpx.get(server["base"] + "/stats", timeout=10).json()["prefix_cache"]
    assert after["hits"] > before["hits"] and 0 < after["hit_rate"] <= 1
    r = httpx.post(server["base"] + "/cache/invalidate", timeout=10)
    assert r.status_code == 200 and r.json()["invalidated"] >= 1
    assert httpx.get(server["base"] + "/stats", timeout=10).json()["prefix_cache"]["entries"] == 0


def test_sixteen_concurrent_streams_all_complete_in_one_batch(server):
    stream_client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="x", max_retries=0, timeout=120)
    results: dict[int, tuple[str, str | None]] = {}
    seen_running: list[int] = []
    stop_polling = threading.Event()

    def poll():
        while not stop_polling.is_set():
            seen_running.append(httpx.get(server["base"] + "/stats", timeout=10).json()["running"])
            time.sleep(0.02)

    def one(i: int):
        text, reason = "", None
        for chunk in _chat(stream_client, max_tokens=48, seed=100 + i, temperature=1.0, stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        results[i] = (text, reason)

    poller = threading.Thread(target=poll)
    poller.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop_polling.set()
    poller.join()
    assert sorted(results) == list(range(16))
    assert all(reason in ("stop", "length") for _, reason in results.values())
    assert max(seen_running) > 1
    # each stream equals the same request served alone (batching does not change a seeded reply)
    alone = _chat(stream_client, max_tokens=48, seed=100, temperature=1.0).choices[0].message.content
    assert results[0][0] == alone


def test_client_disconnect_mid_stream_cancels_the_sequence(server, client):
    # a long reply (400 tokens) so the hang-up arrives while it is still generating, even on a busy machine
    params = {"max_tokens": 400, "temperature": 0.0}
    if _chat(client, **params).choices[0].finish_reason != "length":
        params = {"max_tokens": 400, "temperature": 1.0, "seed": _long_seed(client, max_tokens=400)}
    stats = lambda: httpx.get(server["base"] + "/stats", timeout=10).json()  # noqa: E731
    before = stats()
    body = {"model": MODEL, "messages": HELLO, "stream": True, **params}
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first content delta: hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = stats()
        if s["cancelled"] > before["cancelled"] and s["running"] == 0:
            break
        time.sleep(0.1)
    assert s["cancelled"] > before["cancelled"] and s["running"] == 0, s
    assert s["total_tokens"] - before["total_tokens"] < 400  # it stopped early


# ---- API key and queue limits (the "keyed" app) -----------------------------------------------------


def test_api_key_required_when_configured(server):
    base = server["base"] + "/keyed"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(base + "/v1/chat/completions", json=OK, headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(base + "/cache/invalidate", timeout=10).status_code == 401
    keyed = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    assert keyed.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="bad", max_retries=0).models.list()
    r = httpx.post(base + "/cache/invalidate", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 200


def test_full_queue_answers_429_and_the_rest_complete(server):
    base = server["base"] + "/keyed"
    responses: list[httpx.Response] = []

    def one():
        responses.append(httpx.post(
            base + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": MODEL, "messages": HELLO, "max_tokens": 100, "seed": 1, "temperature": 0},
        ))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    rejected = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"] for r in rejected)


# ---- slow: browser UI and locust --------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=600)
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium browser available and it could not be installed (apt-get install chromium)")
    return sync_playwright


@pytest.mark.slow
def test_ui_streams_edits_regenerates_and_runs_slash_commands(server):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page()
        page.goto(server["base"] + "/")
        page.wait_for_selector("#model:has-text('tiny-serve')")
        assert not page.is_visible("#banner")
        box = page.locator("#input")
        box.fill("/temperature 0")
        box.press("Enter")
        page.wait_for_selector(".msg.system:has-text('temperature set to 0')")
        box.fill("/topk 5")
        box.press("Enter")
        page.wait_for_selector(".msg.system:has-text('top-k set to 5')")
        box.fill("/help")
        box.press("Enter")
        page.wait_for_selector(".msg.system:has-text('/clear')")
        box.fill("Hello there")
        box.press("Enter")
        page.wait_for_selector(".msg.assistant:not(.typing)")
        page.wait_for_function("!document.querySelector('.typing')")
        first = page.locator(".msg.assistant").inner_text()
        assert page.locator(".msg.user").inner_text() == "Hello there"
        # regenerate: greedy, so the same reply comes back
        page.locator(".msg.assistant").click()
        page.wait_for_function("!document.querySelector('.typing') && document.querySelectorAll('.msg.assistant').length == 1")
        assert page.locator(".msg.assistant").inner_text() == first
        # edit: clicking the user message puts it back in the box and drops the turn
        page.locator(".msg.user").click()
        assert box.input_value() == "Hello there" and page.locator(".msg.user").count() == 0
        box.fill("Edited question")
        box.press("Enter")
        page.wait_for_function("!document.querySelector('.typing') && document.querySelectorAll('.msg.assistant').length == 1")
        assert page.locator(".msg.user").inner_text() == "Edited question"
        box.fill("/clear")
        box.press("Enter")
        assert page.locator(".msg.user").count() == 0
        # health banner when the server is unreachable
        page.route("**/health", lambda route: route.abort())
        page.reload()
        page.wait_for_selector("#banner.show")
        browser.close()


@pytest.mark.slow
def test_headless_locust_run_has_no_failures(server, tmp_path):
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    if locust is None:
        pytest.skip("locust is not installed (pip install locust)")
    locustfile = Path(__file__).parents[1] / "loadtests" / "locustfile.py"
    env = {**os.environ, "NANOCHAT_MODEL": MODEL, "NANOCHAT_MAX_TOKENS": "24"}
    # a separate process: locust's gevent monkey-patching must not touch this one
    proc = subprocess.run(
        [locust, "-f", str(locustfile), "--headless", "-u", "8", "-r", "4", "-t", "12s", "--stop-timeout", "30", "--host", server["base"],
         "--csv", str(tmp_path / "run"), "--only-summary"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (tmp_path / "run_stats.csv").read_text().splitlines()
    header = rows[0].split(",")
    agg = dict(zip(header, rows[-1].split(",")))
    assert agg["Name"] == "Aggregated" and int(agg["Request Count"]) > 0 and int(agg["Failure Count"]) == 0
    names = {r.split(",")[1] for r in rows[1:]}
    assert {"ttft", "inter_token_latency"} <= names


# ---- log-probabilities over HTTP, parsed by the openai client (engine-level checks: test_logprobs.py) ----


def test_openai_client_parses_chat_logprobs_streamed_and_whole(client):
    whole = _chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens > 0
    for entry in content:  # greedy: each chosen token is the best of its alternatives
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes and entry.logprob <= 0
    stream = _chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed = [x for chunk in stream for c in chunk.choices if c.logprobs for x in c.logprobs.content]
    assert [x.token for x in streamed] == [x.token for x in content]


def test_openai_client_parses_completion_echo_with_max_tokens_zero(client):
    out = client.completions.create(model=MODEL, prompt="the cat sat on the mat", max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == "the cat sat on the mat" and out.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == out.usage.prompt_tokens
    gen = client.completions.create(model=MODEL, prompt="the cat", max_tokens=4, temperature=0, logprobs=2, echo=True)
    glp = gen.choices[0].logprobs
    # an end-of-turn token is listed (it was generated and scored) though not counted as a completion token
    assert len(glp.tokens) - gen.usage.prompt_tokens in (gen.usage.completion_tokens, gen.usage.completion_tokens + 1)
    for chosen, top in zip(glp.token_logprobs[1:], glp.top_logprobs[1:]):
        assert chosen <= max(top.values()) + 1e-6
    streamed = client.completions.create(model=MODEL, prompt="the cat", max_tokens=4, temperature=0, logprobs=2,
                                         stream=True)
    tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert tokens == glp.tokens[gen.usage.prompt_tokens:]


def test_out_of_range_completion_logprobs_get_an_openai_shaped_400(server):
    for body, param in [({"prompt": "hi", "logprobs": 21}, "logprobs"), ({"prompt": "hi", "max_tokens": 0}, None)]:
        r = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, **body}, timeout=30)
        err = _assert_openai_error(r, 400)
        assert err["code"] == "invalid_value" and (param is None or err["param"] == param), err


# ---- lm-evaluation-harness against this server (docs/evaluation.md) -----------------------------

ARC_LM_EVAL_DOCS = 8  # ARC-Easy questions scored both ways (4 choices each: 32 log-likelihood requests)


def _arc_docs(tokenizer, limit: int, context_len: int) -> tuple[list[int], list[dict]]:
    """The first ``limit`` builtin ARC-Easy eval questions that fit the context, as lm-eval docs.

    How the two evaluators align: ours (nanochat.eval.chat_eval.categorical_batch) renders the
    conversation for completion and takes the argmax of the logits at the last prompt position over
    the option letters. The lm-eval doc's context is exactly that rendering as text (special tokens
    written out; lm-eval's Hugging Face tokenizer, our `export hf`, turns them back into the same ids),
    its choices are the letters with an empty target delimiter, so each choice is one token whose
    summed log-likelihood is that letter's log-softmax at the same position: lm-eval's `acc` argmax
    picks the same letter (log_softmax is monotone in the logits).
    """
    from nanochat.eval.chat_eval import load_task

    task = load_task("ARC-Easy", "builtin")
    indices, docs = [], []
    for i in range(len(task)):
        conv = task[i]
        ids = tokenizer.render_for_completion(conv)
        if len(ids) + 2 > context_len:
            continue
        letters = conv["letters"]
        indices.append(i)
        docs.append({"context": tokenizer.decode(ids), "choices": letters,
                     "gold": letters.index(conv["messages"][-1]["content"])})
        if len(docs) == limit:
            break
    return indices, docs


@pytest.mark.slow
def test_lm_eval_local_completions_accuracy_equals_our_letter_accuracy(server, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from nanochat.checkpoint import load_checkpoint
    from nanochat.eval.chat_eval import accuracy, categorical_shard
    from nanochat.interop.hf_export import export_hf

    ckpt = load_checkpoint(server["checkpoint"])
    indices, docs = _arc_docs(ckpt.tokenizer, ARC_LM_EVAL_DOCS, ckpt.config.sequence_len)
    assert len(docs) == ARC_LM_EVAL_DOCS
    ours = categorical_shard(ckpt.model, ckpt.tokenizer, {"task": "ARC-Easy", "source": "builtin", "batch_size": 8},
                             indices)
    hf_dir = export_hf(server["checkpoint"], tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "nanochat_arc_easy_letters.yaml").write_text(LM_EVAL_TASK_YAML.format(data=tasks / "arc.jsonl"))
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": MODEL, "base_url": server["base"] + "/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(hf_dir), "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1},
        tasks=["nanochat_arc_easy_letters"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
    )
    samples = sorted(results["samples"]["nanochat_arc_easy_letters"], key=lambda s: s["doc_id"])
    # the same choice question by question (lm-eval's argmax of the choices' log-likelihoods = our letter)
    picked = [max(range(len(s["filtered_resps"])), key=lambda c: s["filtered_resps"][c][0]) for s in samples]
    assert [d["choices"][p] for d, p in zip(docs, picked)] == [r["pred"] for r in ours]
    assert [bool(s["acc"]) for s in samples] == [r["correct"] for r in ours]
    print(f"lm-eval acc {results['results']['nanochat_arc_easy_letters']['acc,none']:.4f}, ours {accuracy(ours):.4f}")
    assert results["results"]["nanochat_arc_easy_letters"]["acc,none"] == pytest.approx(accuracy(ours))


LM_EVAL_TASK_YAML = """\
task: nanochat_arc_easy_letters
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
