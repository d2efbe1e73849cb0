"""The Ray Serve application: the OpenAI routes, and the autoscaled replicas that hold the engine.

Two layouts (chosen by :func:`nanochat.serve.build.build_app_with` from ``serve.router`` and the
replica range); the deployment whose replicas hold the engine is named ``NanochatServer`` in both,
so a config's ``deployments:`` entry and ``serve status`` mean the same thing either way:

- one deployment (one replica, or ``serve.router: power_of_two``): ``NanochatServer`` is both the
  FastAPI ingress and the model (a :class:`~nanochat.serve.backend.LocalBackend`). No Ray hop per
  streamed chunk; Serve's proxy spreads requests over the replicas by power of two choices.
- prefix routing (``serve.router: prefix`` with ``max_replicas > 1``): a light ingress,
  ``NanochatIngress`` (this class with a :class:`~nanochat.serve.backend.RemoteBackend`, no model),
  parses each request and calls the engine replicas (:class:`NanochatModel`, deployed as
  ``NanochatServer``) through a handle whose :class:`~nanochat.serve.router.PrefixAffinityRouter`
  sends a conversation's turns to the replica that holds its history in its prefix cache.

Autoscaling adds engine replicas (one GPU each on a GPU cluster) on ongoing requests.

Thin routes: the API key first, then the JSON body read and validated here (so an unauthenticated
client learns nothing about its body), then the backend (:class:`~nanochat.serve.serving.Serving`,
here or in a model replica) does the rest.

``build_app(args)`` (:mod:`nanochat.serve.build`, re-exported here) is the ``import_path`` target for
``serve run`` / ``serve deploy`` configs: ``nanochat.serve.app:build_app``.
"""

# No `from __future__ import annotations`: Serve pickles the ingress class by value, and FastAPI
# must see real annotation objects (string annotations would not resolve, turning bodies into queries).

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve

from nanochat.serve.backend import DEPLOYMENT, LocalBackend, RemoteBackend, RemoteGeneration
from nanochat.serve.build import (  # noqa: F401  (build_app & co. re-exported: the configs' import_path)
    BuildArgs,
    ServerSettings,
    build_app,
    build_app_with,
    deployment_options,
)
from nanochat.serve.http_api import (
    SSE_HEADERS,
    EventStream,
    api,
    body_doc,
    is_disconnect,
    json_response,
    log,
)
from nanochat.serve.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    validation_error_to_api_error,
)
from nanochat.serve.serving import Generation

UI_FILE = Path(__file__).with_name("ui.html")
BodyT = TypeVar("BodyT", bound=BaseModel)


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


def _replica_count() -> int | None:
    """Running engine replicas of this app (``NanochatServer``, whichever layout)."""
    try:
        ctx = serve.get_replica_context()
        status = serve.status().applications[ctx.app_name].deployments[DEPLOYMENT]
        return int(status.replica_states.get("RUNNING", 0))
    except Exception:
        return None


@serve.deployment(name="NanochatServer", max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class NanochatServer:
    """The OpenAI routes over a backend: this replica's engine, or (``model``: a handle to the
    :class:`NanochatModel` replicas) the engine replicas behind the prefix-affinity router."""

    def __init__(self, settings: dict[str, Any], model: Any = None):
        self.settings = ServerSettings.model_validate(settings)
        self.backend = LocalBackend(self.settings) if model is None else RemoteBackend(model, self.settings)
        self.model_id = self.backend.model_id
        self.disconnects = 0
        self._metrics = self.backend.metrics

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine thread keeps failing is restarted."""
        self.backend.check_health()

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

    async def _respond(self, gen: Generation | RemoteGeneration, stream: bool) -> Response:
        """The whole object, or the SSE stream once its first text exists (so a request that fails
        before any output gets its HTTP error, not a 200)."""
        try:
            if not stream:
                return json_response(await gen.response())
            events = gen.stream()
            first = await anext(events)
        except asyncio.CancelledError:  # Serve cancels the handler when its client hangs up
            self._client_gone()
            raise
        return EventStream(self._closing(first, events), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _closing(self, first: str, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """``first`` then ``events``; on client disconnect count it and close ``events`` (cancels the request)."""
        try:
            yield first
            async for item in events:
                yield item
        except (GeneratorExit, asyncio.CancelledError):
            self._client_gone()
            raise
        finally:
            await events.aclose()

    # ---- routes ---------------------------------------------------------------------------

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def ui(self) -> HTMLResponse:
        return HTMLResponse(UI_FILE.read_text(encoding="utf-8"))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        healthy, error = self.backend.health()
        body = {"status": "ok" if healthy else "degraded", "ready": True, "model": self.model_id}
        if not healthy:
            body["error"] = error
        return JSONResponse(body, status_code=200 if healthy else 503)

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        out = {"model": self.model_id, "replica": _replica_id(), "replicas": _replica_count(),
               "disconnects": self.disconnects}
        out.update(await self.backend.stats())
        return out

    @api.post("/cache/invalidate")
    async def invalidate_cache(self, request: Request) -> dict[str, Any]:
        """Drop this replica's prefix cache (admin): ``invalidated`` = entries dropped."""
        self._authorize(request)
        return {"invalidated": await self.backend.invalidate(), "replica": _replica_id()}

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return await self.backend.models()

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> ModelCard:
        self._authorize(request)
        return await self.backend.model_card(model_id)

    @api.post("/v1/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        return await self._respond(self.backend.generation(body), body.stream)

    @api.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        return await self._respond(self.backend.generation(body), body.stream)


@serve.deployment(name="NanochatModel", max_ongoing_requests=64, health_check_period_s=10)
class NanochatModel:
    """An engine replica behind ``NanochatIngress`` (prefix routing); deployed as ``NanochatServer``.
    No HTTP: the ingress calls :meth:`complete` / :meth:`stream` through its handle."""

    def __init__(self, settings: dict[str, Any]):
        self.backend = LocalBackend(ServerSettings.model_validate(settings))

    def check_health(self) -> None:
        self.backend.check_health()

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve calls this every ``request_routing_stats_period_s``; the ingress's router keeps the
        latest (its ``/stats`` lists them per replica)."""
        return self.backend.report()

    # A refusal travels as a value, not raised: Serve would log a traceback for every 4xx.

    async def complete(self, body: Any) -> Any:
        """The whole OpenAI object of a chat (``ChatCompletionRequest``) or text completion, or the
        :class:`APIError` that refused it."""
        try:
            return await self.backend.generation(body).response()
        except APIError as err:
            return err

    async def stream(self, body: Any) -> AsyncIterator[Any]:
        """Its SSE events, or one :class:`APIError` if it failed before any output (a later failure is
        an error event in the stream)."""
        try:
            async for event in self.backend.generation(body).stream():
                yield event
        except APIError as err:
            yield err
