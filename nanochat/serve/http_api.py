"""The FastAPI app of the server, its OpenAI-shaped error handlers, the SSE response, and the metrics.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` JSON: request validation,
unknown routes, engine refusals, and anything unexpected (a 500 ``server_error``). A client that hangs
up is no error: Serve reports it as ``TaskCancelledError`` from ``receive`` (or Starlette as
``ClientDisconnect``), which :func:`is_disconnect` recognizes. The routes live on
:class:`nanochat.serve.app.NanochatServer`.
"""

# No `from __future__ import annotations` (see nanochat.serve.app): FastAPI reads these annotations.

import asyncio
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanochat.common import get_logger
from nanochat.serve.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error_to_api_error,
)
from nanochat.serve.serving import Metrics as ServingMetrics

log = get_logger("nanochat.serve.app")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of SSE


class OpenAIApp(FastAPI):
    """FastAPI whose OpenAPI schema also documents the bodies the routes parse themselves."""

    bodies = (ChatCompletionRequest, CompletionRequest)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            defs = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in self.bodies:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                defs.update(body.pop("$defs", {}))
                defs[model.__name__] = body
        return self.openapi_schema


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


api = OpenAIApp(title="nanochat", description="OpenAI-compatible chat API for a nanochat checkpoint")


def is_disconnect(err: BaseException) -> bool:
    """The client went away: Starlette's ClientDisconnect, or Serve's TaskCancelledError from ``receive``."""
    return isinstance(err, ClientDisconnect | TaskCancelledError)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return error_response(err)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(validation_error_to_api_error(list(err.errors())))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(err.status_code, "invalid_request_error")
    return error_response(APIError(err.status_code, str(err.detail), type=kind))


@api.exception_handler(Exception)
async def _server_error(_: Request, err: Exception) -> Response:
    if is_disconnect(err):  # normal: the client hung up before the response was complete
        log.info("client disconnected (%s)", type(err).__name__)
        return Response(status_code=499)
    log.exception("unhandled error")
    return error_response(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))


def json_response(obj: BaseModel) -> Response:
    return Response(obj.model_dump_json(), media_type="application/json")


class EventStream(StreamingResponse):
    """SSE response. Serve's ``receive`` raises TaskCancelledError once the client is gone: that is a
    disconnect like any other (it ends the stream), not a server error."""

    async def listen_for_disconnect(self, receive: Any) -> None:
        try:
            await super().listen_for_disconnect(receive)
        except Exception as err:
            if not is_disconnect(err):
                raise


class Metrics(ServingMetrics):
    """Prometheus metrics exported through Serve (scraped from each node's metrics port, with Ray's
    ``ray_`` prefix; Serve adds deployment/replica/application tags). Besides the counters and
    histograms the serving layer feeds, a sampler thread (:meth:`watch`) sets every
    ``SAMPLE_EVERY_S``: running/waiting sequences, KV-cache slots in use (of ``max_batch_size``),
    output tokens/s, and the prefix cache's hit rate and lookups. HTTP responses by status are
    counted by :class:`CountResponses`."""

    SAMPLE_EVERY_S = 1.0

    def __init__(self, model: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.model = model
        tags = ("model",)
        self.running = Gauge("nanochat_running_sequences", "sequences decoding now", tag_keys=tags)
        self.waiting = Gauge("nanochat_waiting_sequences", "sequences waiting for a slot", tag_keys=tags)
        self.slots_used = Gauge("nanochat_kv_cache_slots_used", "KV-cache slots holding a sequence", tag_keys=tags)
        self.slot_usage = Gauge("nanochat_kv_cache_slot_usage", "fraction of the KV-cache slots in use",
                                tag_keys=tags)
        self.tokens_per_s = Gauge("nanochat_output_tokens_per_second", "generated tokens per second (last "
                                  "sampling interval)", tag_keys=tags)
        self.prefix_hit_rate = Gauge("nanochat_prefix_cache_hit_rate", "prefix-cache hits / lookups since start",
                                     tag_keys=tags)
        self.prefix_hits = Counter("nanochat_prefix_cache_hits_total", "prompts that reused a cached prefix",
                                   tag_keys=tags)
        self.prefix_lookups = Counter("nanochat_prefix_cache_lookups_total", "prompts looked up in the prefix "
                                      "cache", tag_keys=tags)
        self.itl = Histogram(
            "nanochat_inter_token_latency_seconds",
            "time between a stream's generated tokens (mean over each streamed chunk)",
            boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
            tag_keys=tags,
        )
        self._sampler: threading.Thread | None = None
        self.requests = Counter("nanochat_requests_total", "completion requests received", tag_keys=("model", "route"))
        self.tokens = Counter("nanochat_generated_tokens_total", "completion tokens generated", tag_keys=("model",))
        self.rejected = Counter("nanochat_rejected_total", "requests refused with 429 (queue full)", tag_keys=("model",))
        self.disconnects = Counter(
            "nanochat_client_disconnects_total", "requests whose client hung up before the end", tag_keys=("model",)
        )
        self.ttft = Histogram(
            "nanochat_ttft_seconds",
            "time from request admission to the first generated text",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
            tag_keys=("model",),
        )

    def watch(self, scheduler: Any) -> None:
        """Start the sampler thread (once); it reads counters and lengths only, so it needs no lock."""
        if self._sampler is None:
            self._sampler = threading.Thread(target=self._sample_forever, args=(scheduler,), daemon=True,
                                             name="nanochat-metrics")
            self._sampler.start()

    def _sample_forever(self, scheduler: Any) -> None:
        last = (time.monotonic(), scheduler.total_tokens, 0, 0)
        while True:
            time.sleep(self.SAMPLE_EVERY_S)
            try:
                last = self.sample(scheduler, last)
            except Exception as err:  # noqa: BLE001 - a metrics hiccup must never take the replica down
                log.debug("metrics sample failed: %s", err)

    def sample(self, scheduler: Any, last: tuple[float, int, int, int]) -> tuple[float, int, int, int]:
        """Set the gauges from ``scheduler`` once; ``last``: (time, tokens, hits, lookups) of the previous call."""
        tags = {"model": self.model}
        running, slots = scheduler.num_running, max(1, scheduler.engine.max_batch_size)
        self.running.set(running, tags=tags)
        self.waiting.set(scheduler.num_waiting, tags=tags)
        self.slots_used.set(running, tags=tags)
        self.slot_usage.set(running / slots, tags=tags)
        now, tokens = time.monotonic(), scheduler.total_tokens
        self.tokens_per_s.set((tokens - last[1]) / max(now - last[0], 1e-6), tags=tags)
        hits = lookups = 0
        cache = getattr(scheduler.engine, "prefix_cache", None)
        if cache is not None:
            hits, lookups = int(cache.hits), int(cache.hits + cache.misses)
            self.prefix_hit_rate.set(hits / lookups if lookups else 0.0, tags=tags)
            if hits > last[2]:  # Serve's Counter rejects inc(0)
                self.prefix_hits.inc(hits - last[2], tags=tags)
            if lookups > last[3]:
                self.prefix_lookups.inc(lookups - last[3], tags=tags)
        return now, tokens, hits, lookups


class CountResponses:
    """ASGI middleware: ``nanochat_responses_total{route, status}`` for the completion routes, 499 when
    the client hung up first (a plain ASGI wrapper: it passes ``receive`` through untouched, so
    disconnects reach the routes exactly as before)."""

    ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
    _counter: Any = None

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        route = next((name for suffix, name in self.ROUTES.items() if path.endswith(suffix)), None)
        if route is None:
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def sending(message: dict) -> None:
            if message.get("type") == "http.response.start":
                status.append(int(message.get("status", 0)))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException as err:
            if not status:
                status.append(499 if is_disconnect(err) or isinstance(err, asyncio.CancelledError) else 500)
            raise
        finally:
            self.count(route, status[0] if status else 499)

    @classmethod
    def count(cls, route: str, status: int) -> None:
        try:
            if cls._counter is None:
                from ray.serve.metrics import Counter

                cls._counter = Counter("nanochat_responses_total", "completion responses by route and HTTP "
                                       "status (499: the client hung up first)", tag_keys=("route", "status"))
            cls._counter.inc(tags={"route": route, "status": str(status)})
        except Exception as err:  # noqa: BLE001 - e.g. outside a Ray worker (unit tests): nothing to export to
            log.debug("response not counted: %s", err)


api.add_middleware(CountResponses)
