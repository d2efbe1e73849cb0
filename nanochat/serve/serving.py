"""The serving layer: OpenAI chat and text completions over the scheduler, without HTTP.

As vLLM splits its server: protocol (:mod:`~nanochat.serve.openai_types`, :mod:`~nanochat.serve.messages`),
this serving logic, and thin routes plus the Serve deployment (:mod:`nanochat.serve.app`).
:class:`Serving` admits a validated request as a :class:`Generation`, which merges the scheduler's
token events into per-choice text deltas, counts completion tokens, times the first text, and gives
the whole OpenAI object or its SSE events; chat and text completions share all of it. No FastAPI and
no Ray here (a test checks): errors are :class:`APIError`, counters go through :class:`Metrics`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel

from nanochat.config import ServeSettings
from nanochat.serve.logprobs import Logprobs
from nanochat.serve.messages import MessageError, render_prompt
from nanochat.serve.openai_types import (
    APIError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    ResponseMessage,
    SamplingFields,
    TextCompletion,
    Usage,
    new_id,
    now,
)
from nanochat.serve.scheduler import DONE, QueueFull, Scheduler
from nanochat.serve.scheduler import Request as SchedRequest

SSE_DONE = "data: [DONE]\n\n"
RETRY_AFTER = {"Retry-After": "1"}
Batch = list[tuple[int, str, str | None]]  # (choice, text delta, finish_reason or None), one per choice


class _Unrecorded:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class Metrics:
    """What the serving layer counts, shaped like Ray Serve's metrics (``inc``/``observe`` with ``tags``):
    ``requests`` (tags model, route), ``tokens`` generated, ``rejected`` (429s), ``ttft`` (seconds from
    admission to first text), ``itl`` (seconds between a stream's tokens). ``watch(scheduler)`` starts
    sampling the scheduler's state (sequences, slots, throughput, prefix cache). These record nothing;
    :class:`nanochat.serve.http_api.Metrics` exports them."""

    requests = tokens = rejected = ttft = itl = _Unrecorded()

    def watch(self, scheduler: Scheduler) -> None:
        """Sample ``scheduler`` from now on (no-op here)."""


def sse(obj: BaseModel | str, exclude: set[str] | None = None) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json(exclude=exclude)
    return f"data: {data}\n\n"


def engine_error(err: BaseException, param: str) -> APIError:
    """An exception the scheduler put in a request's queue → the OpenAI error for that request alone."""
    from nanochat.engine import ContextLengthError, EngineError

    if isinstance(err, ContextLengthError):
        return APIError(400, str(err), param=param, code="context_length_exceeded")
    if isinstance(err, EngineError):
        return APIError(400, str(err), param=param, code="invalid_value")
    return APIError(500, f"generation failed: {err}", type="server_error", code="engine_error")


def merge(items: list[Any], counts: list[int], param: str,
          record: Callable[[int, Any], None] | None = None) -> tuple[Batch, bool]:
    """Queue items → one delta per choice and whether the request ended; counts completion tokens.

    ``counts[choice]`` grows by one per generated token (the end-of-turn token is not one); ``record``
    (if given) sees every ``(choice, event)`` (logprobs). Raises :class:`APIError` when the engine
    refused the request or one of its sequences failed.
    """
    merged: dict[int, tuple[str, str | None]] = {}
    end = False
    for item in items:
        if item is DONE:
            end = True
        elif isinstance(item, BaseException):
            raise engine_error(item, param)
        else:
            choice, ev = item
            if ev.finish_reason == "error":
                raise APIError(500, f"generation failed: {ev.error}", type="server_error", code="engine_error")
            if not ev.ends_turn:
                counts[choice] += 1
            if record is not None:
                record(choice, ev)
            reason = ("length" if ev.finish_reason == "length" else "stop") if ev.finished else None
            if ev.text or reason:
                text, old = merged.get(choice, ("", None))
                merged[choice] = (text + ev.text, reason or old)
    return [(choice, text, reason) for choice, (text, reason) in merged.items()], end


class Generation:
    """One admitted request (``chat``: a chat completion, else a text completion): its deltas, usage
    and OpenAI response, whole or streamed. Choices run prompt by prompt: ``choice = g * n + i``."""

    def __init__(self, serving: Serving, sreq: SchedRequest, prompt_tokens: int, chat: bool, include_usage: bool,
                 logprobs: Logprobs | None = None):
        self.serving, self.request, self.chat, self.include_usage = serving, sreq, chat, include_usage
        self.param = "messages" if chat else "prompt"  # the field a refusal names
        self.prompt_tokens = prompt_tokens  # OpenAI counts each prompt once, however many choices
        self.counts = [0] * (len(sreq.prompts) * sreq.n)  # completion tokens per choice
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.logprobs = logprobs  # None: the client asked for neither logprobs nor echo

    def usage(self) -> Usage:
        done = sum(self.counts)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)

    async def deltas(self) -> AsyncIterator[Batch]:
        """Delta batches until the request ends; cancels it if left early (disconnect or error)."""
        sreq, metrics, tags = self.request, self.serving.metrics, self.serving.tags
        interval, first, last_yield, counted = self.serving.settings.stream_interval_ms / 1000, True, 0.0, 0
        try:
            while True:
                items = [await sreq.queue.get()]
                # After the first token, send at most one chunk per interval per stream: every chunk
                # costs a message from replica to proxy, which dominates CPU on small models.
                wait = interval - (time.perf_counter() - last_yield)
                if not first and wait > 0 and items[0] is not DONE:
                    await asyncio.sleep(wait)
                while not sreq.queue.empty():  # coalesce whatever the last steps produced
                    items.append(sreq.queue.get_nowait())
                batch, end = merge(items, self.counts, self.param, self.logprobs and self.logprobs.record)
                if self.logprobs is not None and self.logprobs.scored_only:  # max_tokens 0: drop the token run
                    self.counts[:] = [0] * len(self.counts)
                    batch = [(c, "", "length") for c, _, r in batch if r]
                if batch:
                    now_s, done = time.perf_counter(), sum(self.counts)
                    if first:
                        metrics.ttft.observe(now_s - sreq.created, tags=tags)
                        first = False
                    elif done > counted:  # inter-token latency: the mean gap of the tokens since the last batch
                        metrics.itl.observe((now_s - last_yield) / (done - counted), tags=tags)
                    last_yield, counted = now_s, done
                    yield batch
                if end:
                    return
        finally:
            self.serving.scheduler.cancel(sreq)  # no-op when finished; frees the slots on disconnect or error
            if sum(self.counts):  # Serve's Counter rejects inc(0)
                metrics.tokens.inc(sum(self.counts), tags=tags)

    async def response(self) -> ChatCompletion | TextCompletion:
        """The whole (non-streamed) OpenAI object; raises :class:`APIError` if the request failed."""
        texts, reasons = [""] * len(self.counts), ["stop"] * len(self.counts)
        async for batch in self.deltas():
            for choice, text, reason in batch:
                texts[choice] += text
                reasons[choice] = reason or reasons[choice]
        lp = self.logprobs
        if lp is not None and not self.chat:
            texts = [lp.echo_text(i) + t for i, t in enumerate(texts)]
        choices = [ChatChoice(index=i, message=ResponseMessage(content=t), finish_reason=r,
                              logprobs=lp and lp.chat(i)) if self.chat
                   else CompletionChoice(index=i, text=t, finish_reason=r, logprobs=lp and lp.completion(i))
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return self._object(ChatCompletion, choices, usage=self.usage())

    async def stream(self) -> AsyncIterator[str]:
        """SSE events: (chat) a role chunk per choice with the first text, the rest, the usage event if
        asked, ``[DONE]``. The first item comes once the first text exists, and raises :class:`APIError`
        when the request failed before any output (answer it as an HTTP error); a later error becomes an
        error event."""
        deltas = self.deltas()
        try:
            first = await anext(deltas, None)
            roles = [self._event([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
                     for i in range(len(self.counts) if self.chat else 0)]
            yield "".join(roles) + self._render(first or [])
            try:
                async for batch in deltas:
                    yield self._render(batch)
            except APIError as err:
                yield sse(json.dumps(err.body()))  # the 200 is out: OpenAI's error event
            else:
                if self.include_usage:
                    yield self._event([], usage=self.usage())
            yield SSE_DONE
        finally:
            await deltas.aclose()

    def _render(self, batch: Batch) -> str:
        """A delta batch as SSE: chat sends a choice's text and its finish reason as separate chunks."""
        lp = self.logprobs
        if not self.chat:
            return "".join(self._event([CompletionChoice(index=c, text=(lp.echo_text(c) if lp else "") + t,
                                                         finish_reason=r, logprobs=lp and lp.completion(c))])
                           for c, t, r in batch)
        parts = []
        for choice, text, reason in batch:
            logprobs = lp and lp.chat(choice)
            if text or (logprobs and logprobs.content):
                parts.append(self._event([ChunkChoice(index=choice, delta=Delta(content=text), logprobs=logprobs)]))
            if reason:
                parts.append(self._event([ChunkChoice(index=choice, delta=Delta(), finish_reason=reason)]))
        return "".join(parts)

    def _event(self, choices: list[Any], **fields: Any) -> str:
        return sse(self._object(ChatCompletionChunk, choices, **fields), None if self.include_usage else {"usage"})

    def _object(self, chat_kind: type[BaseModel], choices: list[Any], **fields: Any) -> Any:
        kind = chat_kind if self.chat else TextCompletion  # a text completion streams as TextCompletion too
        return kind(id=self.id, created=self.created, model=self.serving.model_id, choices=choices, **fields)


class Serving:
    """The OpenAI API of one model (its engine behind ``scheduler``) minus HTTP; ``settings``: the
    preset's ``serve`` section. A refusal is an :class:`APIError`: 400 if the request can never be
    admitted (it names the limit), 429 if the queue is full (retry later)."""

    def __init__(self, tokenizer: Any, scheduler: Scheduler, model_id: str, context_len: int,
                 settings: ServeSettings, metrics: Metrics | None = None):
        self.tokenizer, self.scheduler, self.settings = tokenizer, scheduler, settings
        self.model_id, self.context_len = model_id, context_len
        self.metrics, self.tags = metrics or Metrics(), {"model": model_id}
        self.metrics.watch(scheduler)
        self.created = now()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"The model '{model[:100]}' does not exist; this server serves '{self.model_id}' "
                           "(GET /v1/models)", type="not_found_error", param="model", code="model_not_found")

    def model_card(self, model: str | None = None) -> ModelCard:
        self.check_model(model)
        return ModelCard(id=self.model_id, created=self.created, max_model_len=self.context_len)

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def chat(self, body: ChatCompletionRequest) -> Generation:
        """Admit a chat completion; raises :class:`APIError` (4xx) if it cannot be."""
        self.check_model(body.model)
        self.metrics.requests.inc(tags={**self.tags, "route": "chat"})
        try:
            prompt = render_prompt(self.tokenizer, body.messages)
        except MessageError as err:
            raise APIError(400, str(err), param=err.param, code="invalid_messages") from None
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="invalid_messages") from None
        params = self.sampling_params(body, len(prompt), self.settings.max_new_tokens)
        logprobs = Logprobs(self.tokenizer, [prompt], body.n, body.top_k_logprobs) if body.logprobs else None
        return Generation(self, self._submit([prompt], [params]), len(prompt), True, body.include_usage, logprobs)

    def completion(self, body: CompletionRequest) -> Generation:
        """Admit a text completion (one or many prompts); raises :class:`APIError` (4xx) if it cannot be."""
        self.check_model(body.model)
        self.metrics.requests.inc(tags={**self.tags, "route": "completions"})
        raw_prompts = body.prompts()
        limit = self.scheduler.max_waiting
        if len(raw_prompts) > limit:  # could never be admitted: a 400, not a 429 to retry
            raise APIError(400, f"{len(raw_prompts)} prompts in one request; this server takes at most {limit} "
                           "(serve.max_waiting): split the batch", param="prompt", code="invalid_value")
        bos, vocab = self.tokenizer.get_bos_token_id(), self.tokenizer.vocab_size
        prompts: list[list[int]] = []
        for p in raw_prompts:
            if not isinstance(p, str) and any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
            prompts.append([bos] + self.tokenizer.encode(p) if isinstance(p, str) else list(p))
        params = [self.sampling_params(body, len(p), 16, "prompt") for p in prompts]  # OpenAI's default max_tokens: 16
        logprobs = None
        if body.logprobs is not None or body.echo:
            logprobs = Logprobs(self.tokenizer, prompts, body.n, body.logprobs, echo=body.echo,
                                texts=[p if isinstance(p, str) else None for p in raw_prompts],
                                scored_only=body.max_tokens == 0, keep_end=True)
        sreq = self._submit(prompts, params)
        return Generation(self, sreq, sum(len(p) for p in prompts), False, body.include_usage, logprobs)

    def sampling_params(self, req: SamplingFields, prompt_len: int, default_max: int, param: str = "messages") -> Any:
        """SamplingParams for one prompt; checks that prompt + max_tokens fits the context (``param``: the
        prompt's field, named in the 400)."""
        from nanochat.engine import SamplingParams

        unsupported = req.unsupported_fields()
        if unsupported:
            name = unsupported[0]
            raise APIError(400, f"'{name}' is not supported by this server (see docs/api.md)", param=name,
                           code="unsupported_parameter")
        room = self.context_len - prompt_len
        if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
            asked = req.max_tokens if req.max_tokens is not None else 1
            raise APIError(400, f"This model's maximum context length is {self.context_len} tokens. However, you "
                           f"requested {prompt_len + asked} tokens ({prompt_len} in the {param}, {asked} in the "
                           f"completion). Please reduce the length of the {param} or completion.",
                           param=param, code="context_length_exceeded")
        batch = self.scheduler.engine.max_batch_size
        if req.n > batch:
            raise APIError(400, f"n={req.n} exceeds this server's batch size {batch}; lower n",
                           param="n", code="invalid_value")
        s = self.settings
        echo = bool(getattr(req, "echo", False))
        return SamplingParams(
            # max_tokens 0 (echo only): one token is decoded and dropped; the prefill scores the prompt
            max_tokens=max(req.max_tokens, 1) if req.max_tokens is not None else min(default_max, room),
            temperature=s.temperature if req.temperature is None else req.temperature,
            top_k=(s.top_k if req.top_k is None else req.top_k) or None,
            top_p=req.top_p,
            seed=req.seed % 2**63 if req.seed is not None else random.randrange(2**31),
            stop=req.stop or [],
            n=req.n,
            strict_context=True,
            use_tools=s.tools,
            logprobs=req.top_k_logprobs if req.top_k_logprobs is not None else (0 if echo else None),
            prompt_logprobs=echo,
        )

    def _submit(self, prompts: list[list[int]], params: list[Any]) -> SchedRequest:
        try:
            return self.scheduler.submit(prompts, params)
        except QueueFull as err:
            self.metrics.rejected.inc(tags=self.tags)
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full", headers=RETRY_AFTER) from None
