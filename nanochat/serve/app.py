"""The Ray Serve application: one autoscaled deployment that is both HTTP ingress and model.

``NanochatServer`` holds a checkpoint's engine and a continuous-batching :class:`Scheduler`,
and serves the OpenAI-compatible API through FastAPI (``@serve.ingress``). Keeping ingress and
model in one deployment saves a Ray hop per streamed chunk (streaming overhead grows with every
intermediate deployment); Serve's proxy still spreads requests over the replicas, and
autoscaling adds replicas (one GPU each on a GPU cluster) on ongoing requests.

``build_app(args)`` is the ``import_path`` target for ``serve run`` / ``serve deploy`` configs.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI
# must see real annotation objects (string annotations would not resolve, turning bodies into queries).

import asyncio
import os
import random
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.common import get_logger
from nanochat.config import ServeSettings
from nanochat.serve.openai_types import (
    APIError,
    AssistantMessage,
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
    SamplingFields,
    TextCompletion,
    Usage,
    new_id,
    now,
    validation_error_to_api_error,
)
from nanochat.serve.scheduler import DONE, QueueFull, Scheduler
from nanochat.serve.scheduler import Request as SchedRequest

log = get_logger(__name__)
UI_FILE = Path(__file__).with_name("ui.html")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of SSE

api = FastAPI(title="nanochat", description="OpenAI-compatible chat API for a nanochat checkpoint")


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    e = validation_error_to_api_error(list(err.errors()))
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(err.status_code, "invalid_request_error")
    return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)


@api.exception_handler(Exception)
async def _server_error(_: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", type="server_error").body(), 500)


class ServerSettings(ServeSettings):
    """What a replica needs: the preset's ``serve`` section plus the checkpoint and device."""

    checkpoint: str
    device: str | None = None


def _sse(obj: BaseModel | str) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json()
    return f"data: {data}\n\n"


async def _closing(gen: AsyncIterator[str], inner: Any) -> AsyncIterator[str]:
    """Forward ``gen``; on client disconnect (cancellation) close ``inner`` so its sequence is cancelled."""
    try:
        async for item in gen:
            yield item
    finally:
        await inner.aclose()


class _Metrics:
    """Prometheus metrics exported through Serve (scraped from each node's metrics port)."""

    def __init__(self, model: str):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("nanochat_requests_total", "completion requests received", tag_keys=("model", "route"))
        self.tokens = Counter("nanochat_generated_tokens_total", "completion tokens generated", tag_keys=("model",))
        self.rejected = Counter("nanochat_rejected_total", "requests refused with 429 (queue full)", tag_keys=("model",))
        self.ttft = Histogram(
            "nanochat_ttft_seconds",
            "time from request admission to the first generated text",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
            tag_keys=("model",),
        )


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
        self._metrics = _Metrics(self.model_id)
        log.info("serving %s (%s) on %s", self.model_id, self.settings.checkpoint, device)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine thread keeps failing is restarted."""
        if not self.scheduler.healthy and self.scheduler.total_steps == 0 and self.scheduler.total_requests > 3:
            raise RuntimeError(f"engine is failing: {self.scheduler.last_error}")

    # ---- auth / helpers -------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
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

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_id}' (GET /v1/models)",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )

    def _sampling(self, req: SamplingFields, prompt_len: int, default_max: int) -> Any:
        """SamplingParams for one prompt; checks that prompt + max_tokens fits the context."""
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
                f"{prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else min(default_max, room)
        if req.n > self.engine.max_batch_size:
            raise APIError(400, f"n={req.n} exceeds this server's batch size {self.engine.max_batch_size}", param="n")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.settings.temperature if req.temperature is None else req.temperature,
            top_k=(self.settings.top_k if req.top_k is None else req.top_k) or None,
            top_p=req.top_p,
            seed=req.seed % 2**63 if req.seed is not None else random.randrange(2**31),
            stop=req.stop or [],
            n=req.n,
            strict_context=True,
            use_tools=False,
        )

    def _submit(self, prompts: list[list[int]], params: list[Any]) -> SchedRequest:
        try:
            return self.scheduler.submit(prompts, params)
        except QueueFull as err:
            self._metrics.rejected.inc(tags={"model": self.model_id})
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full") from None

    async def _deltas(self, sreq: SchedRequest, counts: list[int]) -> AsyncIterator[list[tuple[int, str, str | None]]]:
        """Batches of ``(choice, text, finish_reason|None)``; cancels the request if left early."""
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
                        raise APIError(503, f"generation failed: {item}", type="server_error", code="engine_error")
                    else:
                        choice, ev = item
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
            self.scheduler.cancel(sreq)  # no-op when finished; frees the slots on disconnect
            if sum(counts):  # Serve's Counter rejects inc(0)
                self._metrics.tokens.inc(sum(counts), tags={"model": self.model_id})

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
               "torch_threads": torch.get_num_threads()}
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

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._authorize(request)
        self._check_model(body.model)
        self._metrics.requests.inc(tags={"model": self.model_id, "route": "chat"})
        try:
            prompt = self.tokenizer.render_for_completion({"messages": body.conversation()})
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="invalid_messages") from None
        params = self._sampling(body, len(prompt), self.settings.max_new_tokens)
        sreq = self._submit([prompt], [params])
        counts = [0] * body.n
        rid, created = new_id("chatcmpl"), now()
        usage = lambda: Usage(  # noqa: E731
            prompt_tokens=len(prompt) * body.n, completion_tokens=sum(counts),
            total_tokens=len(prompt) * body.n + sum(counts),
        )
        deltas = self._deltas(sreq, counts)
        if not body.stream:
            texts, reasons = [""] * body.n, ["stop"] * body.n
            async for batch in deltas:
                for choice, text, reason in batch:
                    texts[choice] += text
                    if reason:
                        reasons[choice] = reason
            choices = [
                ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=reasons[i])
                for i in range(body.n)
            ]
            return ChatCompletion(id=rid, created=created, model=self.model_id, choices=choices, usage=usage())

        def chunk(choices: list[ChunkChoice]) -> str:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=choices))

        async def stream() -> AsyncIterator[str]:
            yield "".join(chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))]) for i in range(body.n))
            async for batch in deltas:
                parts = []
                for choice, text, reason in batch:
                    if text:
                        parts.append(chunk([ChunkChoice(index=choice, delta=Delta(content=text))]))
                    if reason:
                        parts.append(chunk([ChunkChoice(index=choice, delta=Delta(), finish_reason=reason)]))
                yield "".join(parts)
            if body.include_usage:
                yield _sse(ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=[], usage=usage()))
            yield "data: [DONE]\n\n"

        return StreamingResponse(_closing(stream(), deltas), media_type="text/event-stream", headers=SSE_HEADERS)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        self._check_model(body.model)
        self._metrics.requests.inc(tags={"model": self.model_id, "route": "completions"})
        bos = self.tokenizer.get_bos_token_id()
        prompts: list[list[int]] = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append([bos] + self.tokenizer.encode(p))
            else:
                if any(t < 0 or t >= self.tokenizer.vocab_size for t in p):
                    raise APIError(400, f"token ids must be in [0, {self.tokenizer.vocab_size})", param="prompt")
                prompts.append(list(p))
        params = [self._sampling(body, len(p), 16) for p in prompts]  # OpenAI's default max_tokens: 16
        all_prompts = [p for p in prompts for _ in range(body.n)]
        sreq = self._submit(prompts, params)
        counts = [0] * len(all_prompts)
        rid, created = new_id("cmpl"), now()
        prompt_total = sum(len(p) for p in all_prompts)
        usage = lambda: Usage(  # noqa: E731
            prompt_tokens=prompt_total, completion_tokens=sum(counts), total_tokens=prompt_total + sum(counts)
        )
        deltas = self._deltas(sreq, counts)
        if not body.stream:
            texts, reasons = [""] * len(all_prompts), ["stop"] * len(all_prompts)
            async for batch in deltas:
                for choice, text, reason in batch:
                    texts[choice] += text
                    if reason:
                        reasons[choice] = reason
            choices = [CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
            return TextCompletion(id=rid, created=created, model=self.model_id, choices=choices, usage=usage())

        async def stream() -> AsyncIterator[str]:
            async for batch in deltas:
                yield "".join(
                    _sse(TextCompletion(id=rid, created=created, model=self.model_id,
                                        choices=[CompletionChoice(index=c, text=t, finish_reason=r)]))
                    for c, t, r in batch
                )
            if body.include_usage:
                yield _sse(TextCompletion(id=rid, created=created, model=self.model_id, choices=[], usage=usage()))
            yield "data: [DONE]\n\n"

        return StreamingResponse(_closing(stream(), deltas), media_type="text/event-stream", headers=SSE_HEADERS)


# ---- building the application -------------------------------------------------------------


class BuildArgs(BaseModel):
    """``args`` of a Serve config (or ``nanochat serve`` flags)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = None  # path, tag dir, stage name (sft|mid|base) or None (latest)
    preset: str = "tiny"
    overrides: list[str] = []  # ``serve.max_batch_size=8`` style, like ``--set``
    api_key: str | None = None
    device: str | None = None


def deployment_options(serve_settings: Any, num_gpus: float) -> dict[str, Any]:
    """Serve deployment options from the preset's ``serve`` section."""
    s = serve_settings
    return {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "initial_replicas": s.min_replicas,
            "max_replicas": max(s.max_replicas, s.min_replicas),
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "metrics_interval_s": 2.0,
            "look_back_period_s": 10.0,
        },
        # On CPU the replica's threads are the engine; 1 logical CPU keeps room for Serve's actors.
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": 0 if num_gpus else 1},
    }


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run module:build_app`` and YAML ``import_path`` (one dict arg)."""
    return build_app_with(args)


def build_app_with(args: dict[str, Any] | None = None, deployment: dict[str, Any] | None = None) -> serve.Application:
    """:func:`build_app` plus ``deployment`` option overrides (what a config's ``deployments:`` entry
    does under ``serve run``; used by ``nanochat serve --config``)."""
    from nanochat.checkpoint import resolve_checkpoint
    from nanochat.config import load_preset

    parsed = BuildArgs.model_validate(args or {})
    overrides = [o if o.startswith("serve.") else f"serve.{o}" for o in parsed.overrides]
    settings = load_preset(parsed.preset, overrides).serve
    checkpoint = str(resolve_checkpoint(parsed.checkpoint).resolve())
    api_key = parsed.api_key or settings.api_key or os.environ.get("NANOCHAT_API_KEY") or None
    num_gpus = settings.num_gpus if settings.num_gpus is not None else _default_gpus()
    replica = ServerSettings(
        **settings.model_dump(exclude={"api_key"}), checkpoint=checkpoint, api_key=api_key, device=parsed.device
    )
    options = deployment_options(settings, num_gpus)
    for key, value in (deployment or {}).items():
        if key == "name":
            continue
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return NanochatServer.options(**options).bind(replica.model_dump())


def _default_gpus() -> float:
    """1 GPU per replica when the cluster (or this machine, before Ray starts) has GPUs."""
    try:
        import ray

        if ray.is_initialized():
            return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    except Exception:
        pass
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0
