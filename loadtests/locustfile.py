"""Locust load test: users stream chat completions and report TTFT, inter-token latency, tokens/s.

Locust times a streaming request only up to its response headers, so the numbers that matter
for an LLM endpoint are fired as extra entries (request_type ``METRIC``; ``response_time`` holds
milliseconds, or tokens/s for ``tokens_per_s``):

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --stop-timeout 30 --host http://127.0.0.1:8000

Environment: NANOCHAT_MODEL (default: the first id of GET /v1/models), NANOCHAT_MAX_TOKENS (64),
NANOCHAT_API_KEY (sent as a Bearer token when set), NANOCHAT_TURNS (1: every request a new chat; N:
each user holds a conversation for N turns, resending its history, as prefix-affinity routing expects).
Run it in its own process: locust's gevent monkey-patching breaks libraries such as deepspeed imported
alongside it.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

PROMPTS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What is 12 times 7?",
    "Tell me a fun fact about owls.",
    "Explain recursion in one sentence.",
    "Give me three names for a cat.",
]


def _metric(name: str, value: float, length: int = 0) -> None:
    events.request.fire(request_type="METRIC", name=name, response_time=value, response_length=length,
                        exception=None, context={})


class ChatUser(HttpUser):
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        key = os.environ.get("NANOCHAT_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.max_tokens = int(os.environ.get("NANOCHAT_MAX_TOKENS", "64"))
        self.model = os.environ.get("NANOCHAT_MODEL")
        self.turns = max(1, int(os.environ.get("NANOCHAT_TURNS", "1")))
        self.history: list[dict] = []
        if not self.model:
            with self.client.get("/v1/models", headers=self.headers, name="/v1/models", catch_response=True) as r:
                self.model = r.json()["data"][0]["id"] if r.ok else None

    @task
    def stream_chat(self) -> None:
        if len(self.history) >= 2 * self.turns:
            self.history = []  # conversation over: start a new one
        question = {"role": "user", "content": random.choice(PROMPTS)}
        body = {
            "model": self.model,
            "messages": [*self.history, question],
            "max_tokens": self.max_tokens,
            "temperature": 0.8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        first = last = None
        chunks = tokens = 0
        reply = ""
        done = False
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                              name="/v1/chat/completions (stream)", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                for line in resp.iter_lines():
                    if not line or not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            reply += choice["delta"]["content"]
                            now = time.perf_counter()
                            first = first or now
                            last = now
                            chunks += 1
            except Exception as err:  # the connection dropped mid-stream
                runner = self.environment.runner
                if runner is not None and runner.state in ("stopping", "stopped"):
                    resp.success()  # cut off by the end of the run, not by the server
                    return
                resp.failure(f"stream broken: {err!r}")
                return
            if not done:
                resp.failure("stream ended without data: [DONE]")
                return
            resp.success()
            self.history += [question, {"role": "assistant", "content": reply or "ok"}]
        end = time.perf_counter()
        if first is not None:
            _metric("ttft", (first - start) * 1000)
            if tokens > 1 and last > first:
                _metric("inter_token_latency", (last - first) * 1000 / (tokens - 1))
        if tokens:
            _metric("tokens_per_s", tokens / (end - start), tokens)
