"""The FastAPI app of the server, its OpenAI-shaped error handlers, and the SSE helpers.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}`` JSON: request validation,
unknown routes, engine refusals, and anything unexpected (a 500 ``server_error``). A client that hangs
up is no error: Serve reports it as ``TaskCancelledError`` from ``receive`` (or Starlette as
``ClientDisconnect``), which :func:`is_disconnect` recognizes. The routes live on
:class:`nanochat.serve.app.NanochatServer`.
"""

# No `from __future__ import annotations` (see nanochat.serve.app): FastAPI reads these annotations.

import json
from collections.abc import AsyncIterator
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

log = get_logger("nanochat.serve.app")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of SSE
SSE_DONE = "data: [DONE]\n\n"
RETRY_AFTER = {"Retry-After": "1"}


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


def sse(obj: BaseModel | str, exclude: set[str] | None = None) -> str:
    data = obj if isinstance(obj, str) else obj.model_dump_json(exclude=exclude)
    return f"data: {data}\n\n"


def sse_error(err: APIError) -> str:
    """An error inside a stream whose 200 was already sent: OpenAI's ``data: {"error": {...}}`` event."""
    return sse(json.dumps(err.body()))


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


async def resume(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def engine_error(err: BaseException, param: str) -> APIError:
    """An exception the scheduler put in a request's queue → the OpenAI error for that request alone."""
    from nanochat.engine import ContextLengthError, EngineError, QueueFullError

    if isinstance(err, QueueFullError):
        return APIError(429, f"server busy: {err}", type="rate_limit_error", code="queue_full", headers=RETRY_AFTER)
    if isinstance(err, ContextLengthError):
        return APIError(400, str(err), param=param, code="context_length_exceeded")
    if isinstance(err, EngineError):
        return APIError(400, str(err), param=param, code="invalid_value")
    return APIError(500, f"generation failed: {err}", type="server_error", code="engine_error")


class Metrics:
    """Prometheus metrics exported through Serve (scraped from each node's metrics port)."""

    def __init__(self, model: str):
        from ray.serve.metrics import Counter, Histogram

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
