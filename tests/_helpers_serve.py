"""Helpers for the serving tests and benchmark: a tiny real checkpoint and a running Serve app."""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import httpx


def build_tiny_checkpoint(root: Path, tokenizer, model_factory, tag: str = "tiny-serve", seq: int = 512) -> Path:
    """Save a small random GPT with the tiny tokenizer as ``<root>/checkpoints/sft/<tag>/step_000001``."""
    from nanochat.checkpoint import save_checkpoint

    model = model_factory(seed=0, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, seq=seq)
    directory = root / "checkpoints" / "sft" / tag / "step_000001"
    return save_checkpoint(directory, model, model.config, tokenizer, stage="sft", step=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2.0, headers=headers)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s (last: {last})")


# ---- the request fuzzer (tests/test_serve.py) ---------------------------------------------------


class _Raw:
    """JSON text that json.dumps cannot write (invalid Unicode, NaN, deep nesting), spliced in as bytes."""

    def __init__(self, data: bytes):
        self.data = data


_INVALID_UNICODE = [_Raw(b'"\\ud800"'), _Raw(b'"a\\udc00b"'), _Raw(b'"\xff\xfe"'), _Raw(b'"\xed\xa0\x80"'), _Raw(b'"\xc3"')]
_WRONG_TYPES = [None, True, False, 0, -1, 1.5, "", "x", [], [None], {}, {"a": 1}, [1, "a", None], _Raw(b"NaN")]
_HUGE = [10**30, -(10**30), 1e308, -1e308, _Raw(b"1e999"), _Raw(b"-Infinity"), 2**63, 2**64, "x" * 100_000,
         ["a"] * 5_000, list(range(5_000)), {str(i): i for i in range(2_000)}]


def _nested(depth: int) -> Any:
    return _Raw(b"[" * depth + b"]" * depth) if depth > 400 else (depth and [_nested(depth - 1)] or [])


_DEEP = [_nested(30), _Raw(b"[" * 300 + b"]" * 300), _Raw(b'{"a":' * 300 + b"1" + b"}" * 300), _nested(5_000)]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _with(body: Any, path: tuple, value: Any) -> Any:
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        if isinstance(target, list) or path[-1] in target:
            del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


_DELETE = object()


def _encode(body: Any) -> bytes:
    raws: list[bytes] = []

    def swap(v: Any) -> Any:
        if isinstance(v, _Raw):
            raws.append(v.data)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(body)).encode()
    for i, data in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"'.encode(), data)
    return text


FUZZ_CHAT = {
    "max_tokens": 2, "seed": 1,
    "messages": [
        {"role": "system", "content": "Be brief.", "name": "s"},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "u"},
        {"role": "assistant", "content": None, "refusal": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}], "audio": {"id": "a"}},
        {"role": "user", "content": "Go"},
    ],
}
FUZZ_COMPLETION = {"prompt": ["a b", "c"], "max_tokens": 2, "seed": 1}


def fuzz_cases(route: str, base_body: dict, model_cls: Any, rng: random.Random) -> list[tuple[str, bytes]]:
    """Every field of the body (those sent and every other one the endpoint takes), each set to one
    value of every kind (invalid Unicode, wrong type, huge, deep nesting) plus two more at random."""
    paths = _paths(base_body) + [(name,) for name in model_cls.model_fields if name not in base_body]
    cases = []
    for path in paths:
        values = [rng.choice(kind) for kind in (_INVALID_UNICODE, _WRONG_TYPES, _HUGE, _DEEP)]
        values += rng.sample(_INVALID_UNICODE + _WRONG_TYPES + _HUGE + _DEEP, 2) + [_DELETE]
        for value in values:
            cases.append((route, _encode(_with(base_body, path, value))))
    for stream in (True, False):  # the whole body, streamed or not
        cases.append((route, _encode({**base_body, "stream": stream, "stream_options": {"include_usage": True}})))
    cases.append((route, _encode({**base_body, "frobnicate": {"x": 1}})))  # a field the endpoint does not take
    cases += [(route, raw) for raw in (b"", b"{", b"[]", b"null", b"\xff", b"{" * 300, b" " * 100_000)]
    return cases
