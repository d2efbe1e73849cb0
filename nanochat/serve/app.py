"""The Ray Serve application: one autoscaled deployment that is both HTTP ingress and model.

``NanochatServer`` holds a checkpoint's engine and a continuous-batching :class:`Scheduler`,
and serves the OpenAI-compatible API through FastAPI (``@serve.ingress``). Keeping ingress and
model in one deployment saves a Ray hop per streamed chunk (streaming overhead grows with every
intermediate deployment); Serve's proxy still spreads requests over the replicas, and
autoscaling adds replicas (one GPU each on a GPU cluster) on ongoing requests.

The completion routes read their JSON body themselves, after the API key check, so an
unauthenticated client learns nothing about its body; every error is OpenAI-shaped JSON.

``build_app(args)`` (:mod:`nanochat.serve.build`, re-exported here) is the ``import_path`` target for
``serve run`` / ``serve deploy`` configs: ``nanochat.serve.app:build_app``.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI
# must see real annotation objects (string annotations would not resolve, turning bodies into queries).

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from nanochat.serve.build import (  # noqa: F401  (build_app & co. re-exported: the configs' import_path)
    BuildArgs,
    ServerSettings,
    build_app,
    build_app_with,
    deployment_options,
)
from nanochat.serve.http_api import (
    RETRY_AFTER,
    SSE_DONE,
    SSE_HEADERS,
    EventStream,
    Metrics,
    api,
    body_doc,
    engine_error,
    is_disconnect,
    json_response,
    log,
    resume,
    sse,
    sse_error,
)
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
    validation_error_to_api_error,
)
from nanochat.serve.scheduler import DONE, QueueFull, Scheduler
from nanochat.serve.scheduler import Request as SchedRequest

UI_FILE = Path(__file__).with_name("ui.html")
BodyT = TypeVar("BodyT", bound=BaseModel)


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


def _replica_count() -> int | None:
    try:
        ctx = serve.get_replica_context()
        status = serve.status().applications[ctx.app_name].deployments[ctx.deployment]
        return int(status.replica_states.get("RUNNING", 0))
    except Exception:
        return None


@serve.deployment(name="NanochatServer", max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class NanochatServer:
    """One replica: checkpoint → engine → scheduler, behind the OpenAI routes."""

    def __init__(self, settings: dict[str, Any]):
        import torch

        from nanochat.checkpoint import load_checkpoint
        from nanochat.common import autodetect_device
        from nanochat.engine import Engine

        self.settings = ServerSettings.model_validate(settings)
        device = torch.device(self.settings.device) if self.settings.device else autodetect_device()
        if device.type == "cpu" and self.settings.cpu_threads:
            # Ray gives the replica as many threads as its num_cpus (1). Measured on 2 cores, that is
            # the faster choice: a second engine thread slows the HTTP proxy more than it speeds decode.
            torch.set_num_threads(self.settings.cpu_threads)
        ckpt = load_checkpoint(self.settings.checkpoint, device=device)
        self.model_id = ckpt.tag
        self.tokenizer = ckpt.tokenizer
        self.context_len = ckpt.config.sequence_len
        self.engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=self.settings.max_batch_size)
        self.scheduler = Scheduler(self.engine, self.settings.max_waiting)
        self.created = now()
        self.disconnects = 0
        self._metrics = Metrics(self.model_id)
        log.info("serving %s (%s) on %s", self.model_id, self.settings.checkpoint, device)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine thread keeps failing is restarted."""
        if not self.scheduler.healthy and self.scheduler.total_steps == 0 and self.scheduler.total_requests > 3:
            raise RuntimeError(f"engine is failing: {self.scheduler.last_error}")

    # ---- auth / helpers -------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        """401 unless the API key (when one is set) is sent; every route but /, /health, /stats, the docs."""
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), key):
            raise APIError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>' (the server's --api-key / "
                "NANOCHAT_API_KEY)",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def _parse(self, request: Request, model: type[BodyT]) -> BodyT:
        """The API key first, then the JSON body validated as ``model`` (any failure: one 400)."""
        self._authorize(request)
        try:
            raw = await request.body()
        except Exception as err:
            if is_disconnect(err):
                self._client_gone()
            raise
        try:
            return model.model_validate_json(raw)
        except ValidationError as err:
            raise validation_error_to_api_error(err.errors(include_url=False)) from None

    def _client_gone(self) -> None:
        """A client hung up: normal under load, so counted (``/stats`` ``disconnects``) and not an error."""
        self.disconnects += 1
        self._metrics.disconnects.inc(tags={"model": self.model_id})
        log.debug("client disconnected (%d so far)", self.disconnects)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(
                404,
                f"The model '{model[:100]}' does not exist; this server serves '{self.model_id}' (GET /v1/models)",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    def _sampling(self, req: SamplingFields, prompt_len: int, default_max: int, param: str = "messages") -> Any:
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
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_len} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the {param}, {asked} in the completion). "
                f"Please reduce the length of the {param} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max, room)
        if req.n > self.engine.max_batch_size:
            raise APIError(400, f"n={req.n} exceeds this server's batch size {self.engine.max_batch_size}; lower n",
                           param="n", code="invalid_value")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.settings.temperature if req.temperature is None else req.temperature,
            top_k=(self.settings.top_k if req.top_k is None else req.top_k) or None,
            top_p=req.top_p,
            seed=req.seed % 2**63 if req.seed is not None else random.randrange(2**31),
            stop=req.stop or [],
            n=req.n,
            strict_context=True,
            use_tools=self.settings.tools,
        )

    def _submit(self, prompts: list[list[int]], params: list[Any]) -> SchedRequest:
        try:
            return self.scheduler.submit(prompts, params)
        except QueueFull as err:
            self._metrics.rejected.inc(tags={"model": self.model_id})
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full", headers=RETRY_AFTER) from None

    async def _deltas(
        self, sreq: SchedRequest, counts: list[int], param: str
    ) -> AsyncIterator[list[tuple[int, str, str | None]]]:
        """Batches of ``(choice, text, finish_reason|None)``; cancels the request if left early.

        Raises :class:`APIError` when the engine refused the request or one of its sequences failed
        (``finish_reason="error"``): that request fails alone, the others in the batch go on.
        """
        terminal = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        first = True
        try:
            interval = self.settings.stream_interval_ms / 1000
            last_yield = 0.0
            while True:
                items = [await sreq.queue.get()]
                # After the first token, send at most one chunk per interval per stream: every chunk
                # costs a message from replica to proxy, which dominates CPU on small models.
                wait = interval - (time.perf_counter() - last_yield)
                if not first and wait > 0 and items[0] is not DONE:
                    await asyncio.sleep(wait)
                while not sreq.queue.empty():  # coalesce whatever the last steps produced
                    items.append(sreq.queue.get_nowait())
                merged: dict[int, list] = {}
                end = False
                for item in items:
                    if item is DONE:
                        end = True
                    elif isinstance(item, BaseException):
                        raise engine_error(item, param)
                    else:
                        choice, ev = item
                        if ev.finish_reason == "error":
                            raise APIError(500, f"generation failed: {ev.error}", type="server_error",
                                           code="engine_error")
                        if ev.token_id not in terminal:
                            counts[choice] += 1
                        reason = None
                        if ev.finished:
                            reason = "length" if ev.finish_reason == "length" else "stop"
                        if ev.text or reason:
                            merged.setdefault(choice, ["", None])
                            merged[choice][0] += ev.text
                            merged[choice][1] = reason or merged[choice][1]
                out = [(choice, text, reason) for choice, (text, reason) in merged.items()]  # one delta per choice
                if out:
                    last_yield = time.perf_counter()
                    if first:
                        self._metrics.ttft.observe(time.perf_counter() - sreq.created, tags={"model": self.model_id})
                        first = False
                    yield out
                if end:
                    return
        finally:
            self.scheduler.cancel(sreq)  # no-op when finished; frees the slots on disconnect or error
            if sum(counts):  # Serve's Counter rejects inc(0)
                self._metrics.tokens.inc(sum(counts), tags={"model": self.model_id})

    async def _collect(self, deltas: AsyncIterator[Any], size: int) -> tuple[list[str], list[str]]:
        """Texts and finish reasons of ``size`` choices (a non-streamed reply)."""
        texts, reasons = [""] * size, ["stop"] * size
        try:
            async for batch in deltas:
                for choice, text, reason in batch:
                    texts[choice] += text
                    if reason:
                        reasons[choice] = reason
        except asyncio.CancelledError:  # Serve cancels the handler when its client hangs up
            self._client_gone()
            raise
        return texts, reasons

    async def _first(self, deltas: AsyncIterator[Any]) -> Any:
        """A stream's first batch, awaited before the 200 goes out so a refused request gets its 4xx."""
        try:
            return await anext(deltas, None)
        except asyncio.CancelledError:
            self._client_gone()
            raise

    async def _closing(self, gen: AsyncIterator[str], inner: AsyncIterator[Any]) -> AsyncIterator[str]:
        """Forward ``gen``; on client disconnect count it and close ``inner`` so its sequences are cancelled."""
        try:
            async for item in gen:
                yield item
        except (GeneratorExit, asyncio.CancelledError):
            self._client_gone()
            raise
        finally:
            await inner.aclose()

    def _stream(
        self, first: Any, deltas: AsyncIterator[Any], render: Callable[[Any], str], head: str = "",
        final: Callable[[], str] | None = None,
    ) -> StreamingResponse:
        """The SSE response: ``head``, each batch through ``render``, ``final()`` (the usage event) and
        ``[DONE]``; an error once the 200 is out becomes an error event before ``[DONE]``."""

        async def events() -> AsyncIterator[str]:
            if head:
                yield head
            try:
                async for batch in resume(first, deltas):
                    yield render(batch)
            except APIError as err:
                yield sse_error(err)
            else:
                if final is not None:
                    yield final()
            yield SSE_DONE

        return EventStream(self._closing(events(), deltas), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- routes ---------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def ui(self) -> HTMLResponse:
        return HTMLResponse(UI_FILE.read_text(encoding="utf-8"))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        body = {"status": "ok" if self.scheduler.healthy else "degraded", "ready": True, "model": self.model_id}
        if not self.scheduler.healthy:
            body["error"] = self.scheduler.last_error
        return JSONResponse(body, status_code=200 if self.scheduler.healthy else 503)

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        import torch

        out = {"model": self.model_id, "replica": _replica_id(), "replicas": _replica_count(),
               "torch_threads": torch.get_num_threads(), "disconnects": self.disconnects}
        out.update(self.scheduler.stats())
        return out

    @api.post("/cache/invalidate")
    async def invalidate_cache(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        fn = getattr(self.engine, "invalidate_prefix_cache", None) or getattr(
            getattr(self.engine, "prefix_cache", None), "invalidate", None
        )
        if fn is None:
            return {"invalidated": 0, "replica": _replica_id()}
        dropped = await self.scheduler.run_in_engine_thread(fn)
        return {"invalidated": dropped if isinstance(dropped, int) else 0, "replica": _replica_id()}

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created, max_model_len=self.context_len)])

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> ModelCard:
        self._authorize(request)
        self._check_model(model_id)
        return ModelCard(id=self.model_id, created=self.created, max_model_len=self.context_len)

    @api.post("/v1/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        self._metrics.requests.inc(tags={"model": self.model_id, "route": "chat"})
        try:
            prompt = render_prompt(self.tokenizer, body.messages)
        except MessageError as err:
            raise APIError(400, str(err), param=err.param, code="invalid_messages") from None
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="invalid_messages") from None
        params = self._sampling(body, len(prompt), self.settings.max_new_tokens)
        sreq = self._submit([prompt], [params])
        counts = [0] * body.n
        rid, created = new_id("chatcmpl"), now()
        usage = lambda: Usage(  # noqa: E731  (OpenAI counts the prompt once, however many choices)
            prompt_tokens=len(prompt), completion_tokens=sum(counts), total_tokens=len(prompt) + sum(counts)
        )
        deltas = self._deltas(sreq, counts, "messages")
        if not body.stream:
            texts, reasons = await self._collect(deltas, body.n)
            choices = [
                ChatChoice(index=i, message=ResponseMessage(content=texts[i]), finish_reason=reasons[i])
                for i in range(body.n)
            ]
            return json_response(ChatCompletion(id=rid, created=created, model=self.model_id, choices=choices, usage=usage()))
        first = await self._first(deltas)
        no_usage = None if body.include_usage else {"usage"}

        def chunk(choices: list[ChunkChoice], **kw: Any) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=choices, **kw), no_usage)

        def render(batch: list[tuple[int, str, str | None]]) -> str:
            parts = []
            for choice, text, reason in batch:
                if text:
                    parts.append(chunk([ChunkChoice(index=choice, delta=Delta(content=text))]))
                if reason:
                    parts.append(chunk([ChunkChoice(index=choice, delta=Delta(), finish_reason=reason)]))
            return "".join(parts)

        head = "".join(chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))]) for i in range(body.n))
        final = (lambda: chunk([], usage=usage())) if body.include_usage else None
        return self._stream(first, deltas, render, head, final)

    @api.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        self._check_model(body.model)
        self._metrics.requests.inc(tags={"model": self.model_id, "route": "completions"})
        raw_prompts = body.prompts()
        limit = self.scheduler.max_waiting
        if len(raw_prompts) > limit:  # could never be admitted: a 400, not a 429 to retry
            raise APIError(400, f"{len(raw_prompts)} prompts in one request; this server takes at most {limit} "
                           "(serve.max_waiting): split the batch", param="prompt", code="invalid_value")
        bos = self.tokenizer.get_bos_token_id()
        prompts: list[list[int]] = []
        for p in raw_prompts:
            if isinstance(p, str):
                prompts.append([bos] + self.tokenizer.encode(p))
            else:
                if any(t < 0 or t >= self.tokenizer.vocab_size for t in p):
                    raise APIError(400, f"token ids must be in [0, {self.tokenizer.vocab_size})", param="prompt",
                                   code="invalid_value")
                prompts.append(list(p))
        params = [self._sampling(body, len(p), 16, "prompt") for p in prompts]  # OpenAI's default max_tokens: 16
        sreq = self._submit(prompts, params)
        counts = [0] * (len(prompts) * body.n)
        rid, created = new_id("cmpl"), now()
        prompt_total = sum(len(p) for p in prompts)  # each prompt once, however many choices
        usage = lambda: Usage(  # noqa: E731
            prompt_tokens=prompt_total, completion_tokens=sum(counts), total_tokens=prompt_total + sum(counts)
        )
        deltas = self._deltas(sreq, counts, "prompt")
        if not body.stream:
            texts, reasons = await self._collect(deltas, len(counts))
            choices = [CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
            return json_response(TextCompletion(id=rid, created=created, model=self.model_id, choices=choices, usage=usage()))
        first = await self._first(deltas)
        no_usage = None if body.include_usage else {"usage"}

        def event(choices: list[CompletionChoice], **kw: Any) -> str:
            return sse(TextCompletion(id=rid, created=created, model=self.model_id, choices=choices, **kw), no_usage)

        def render(batch: list[tuple[int, str, str | None]]) -> str:
            return "".join(event([CompletionChoice(index=c, text=t, finish_reason=r)]) for c, t, r in batch)

        final = (lambda: event([], usage=usage())) if body.include_usage else None
        return self._stream(first, deltas, render, final=final)
