"""Where the routes' generations run: the engine in this replica, or model replicas behind a handle.

:class:`nanochat.serve.app.NanochatServer` (the HTTP routes) talks to one of two backends with the
same interface:

- :class:`LocalBackend`: checkpoint → engine → :class:`~nanochat.serve.scheduler.Scheduler` →
  :class:`~nanochat.serve.serving.Serving`, in this process. The single-deployment layout (the
  ingress replicas hold the engine), and the inside of every model replica.
- :class:`RemoteBackend`: a Serve ``DeploymentHandle`` to the model replicas
  (:class:`nanochat.serve.app.NanochatModel`). The prefix-routing layout: the ingress parses the
  body, and the handle's :class:`~nanochat.serve.router.PrefixAffinityRouter` picks the replica. A
  generation crosses as the validated request and comes back as the same SSE strings (or the whole
  OpenAI object); a refusal in the replica (an :class:`APIError`, sent back as a value) is raised here
  unchanged, so the client gets the same 4xx as from the one-deployment layout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nanochat.serve.http_api import Metrics, log
from nanochat.serve.openai_types import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from nanochat.serve.serving import Generation, Serving

Body = ChatCompletionRequest | CompletionRequest
DEPLOYMENT = "NanochatServer"  # the deployment whose replicas hold the engine, in both layouts


class LocalBackend:
    """The engine of this replica (``settings``: a :class:`nanochat.serve.build.ServerSettings`)."""

    def __init__(self, settings: Any):
        import torch

        from nanochat.checkpoint import load_checkpoint
        from nanochat.common import autodetect_device
        from nanochat.engine import Engine
        from nanochat.serve.scheduler import Scheduler

        self.settings = settings
        device = torch.device(settings.device) if settings.device else autodetect_device()
        if device.type == "cpu" and settings.cpu_threads:
            # Ray gives the replica as many threads as its num_cpus (1). Measured on 2 cores, that is
            # the faster choice: a second engine thread slows the HTTP proxy more than it speeds decode.
            torch.set_num_threads(settings.cpu_threads)
        ckpt = load_checkpoint(settings.checkpoint, device=device)
        self.model_id = ckpt.tag
        self.engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=settings.max_batch_size,
                             compile=settings.compile)
        # Build the compiled decode graphs before serving, so no request pays the compile (0 s when eager).
        warmup_s = self.engine.warmup()
        self.scheduler = Scheduler(self.engine, settings.max_waiting)
        self.metrics = Metrics(self.model_id)
        self.serving = Serving(ckpt.tokenizer, self.scheduler, self.model_id, ckpt.config.sequence_len,
                               settings, self.metrics)
        log.info("serving %s (%s) on %s (decode %s%s)", self.model_id, settings.checkpoint, device,
                 "compiled" if self.engine.decode_compiled else "eager",
                 f", warmed up in {warmup_s:.1f} s" if warmup_s else "")

    def generation(self, body: Body) -> Generation:
        """Admit ``body`` (a chat or text completion); raises :class:`APIError` if it cannot be."""
        return self.serving.chat(body) if isinstance(body, ChatCompletionRequest) else self.serving.completion(body)

    async def models(self) -> ModelList:
        return self.serving.models()

    async def model_card(self, model_id: str) -> ModelCard:
        return self.serving.model_card(model_id)

    def health(self) -> tuple[bool, str | None]:
        return self.scheduler.healthy, self.scheduler.last_error

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine thread keeps failing is restarted."""
        s = self.scheduler
        if not s.healthy and s.total_steps == 0 and s.total_requests > 3:
            raise RuntimeError(f"engine is failing: {s.last_error}")

    async def stats(self) -> dict[str, Any]:
        import torch

        return {"torch_threads": torch.get_num_threads(), "decode_compiled": self.engine.decode_compiled,
                **self.scheduler.stats()}

    async def invalidate(self) -> int:
        """Drop this replica's prefix cache; returns the entries dropped."""
        cache = self.engine.prefix_cache
        return await self.scheduler.run_in_engine_thread(cache.invalidate) if cache is not None else 0

    def report(self) -> dict[str, Any]:
        """What a model replica tells the router (Serve's ``record_routing_stats``): load and prefix cache."""
        s = self.scheduler.stats()
        keys = ("running", "waiting", "total_requests", "total_tokens", "tokens_per_s", "prefix_cache")
        return {k: s[k] for k in keys if k in s}


class RemoteGeneration:
    """A generation in a model replica, seen through the handle like a local :class:`Generation`."""

    def __init__(self, handle: Any, body: Body):
        self.handle, self.body = handle, body

    async def response(self) -> Any:
        try:
            result = await self.handle.complete.remote(self.body)
        except Exception as err:
            raise _unwrap(err) from None
        if isinstance(result, APIError):  # the replica refused it (sent as a value)
            raise result
        return result

    async def stream(self) -> AsyncIterator[str]:
        """The replica's SSE strings; closing this (client gone) cancels the request in the replica."""
        events = self.handle.options(stream=True).stream.remote(self.body)
        try:
            async for item in events:
                if isinstance(item, APIError):
                    raise item
                yield item
        except APIError:
            raise
        except Exception as err:
            raise _unwrap(err) from None
        finally:
            events.cancel()  # no-op once finished; on disconnect it frees the replica's batch slots


class RemoteBackend:
    """The model replicas behind ``handle`` (``settings`` carries the checkpoint's ``model_id`` and
    ``context_len``, read by the builder, so this process never loads the model)."""

    def __init__(self, handle: Any, settings: Any):
        self.handle, self.settings = handle, settings
        self.model_id = settings.model_id
        self.metrics = Metrics(self.model_id)
        # Model cards only: this Serving never admits a request (no tokenizer, no scheduler here).
        self.cards = Serving(None, None, self.model_id, settings.context_len, settings, self.metrics)

    def generation(self, body: Body) -> RemoteGeneration:
        self.cards.check_model(body.model)  # a 404 without a round trip (or a cold start)
        return RemoteGeneration(self.handle, body)

    async def models(self) -> ModelList:
        return self.cards.models()

    async def model_card(self, model_id: str) -> ModelCard:
        return self.cards.model_card(model_id)

    def health(self) -> tuple[bool, str | None]:
        """The ingress is up; model replicas are Serve's to keep healthy (and may be 0: scale to zero)."""
        return True, None

    def check_health(self) -> None:
        return None

    async def stats(self) -> dict[str, Any]:
        """Each model replica's latest report (see :func:`nanochat.serve.router.router_stats`) and totals."""
        from ray import serve

        from nanochat.serve.router import router_stats

        ctx = serve.get_replica_context()
        snapshot = router_stats(ctx.app_name, DEPLOYMENT)
        replicas = snapshot.get("replicas", {})
        totals: dict[str, Any] = {k: sum(r.get(k, 0) for r in replicas.values())
                                  for k in ("running", "waiting", "total_requests", "total_tokens")}
        cache = {k: sum(r.get("prefix_cache", {}).get(k, 0) for r in replicas.values())
                 for k in ("hits", "misses", "tokens_reused", "entries", "cached_tokens")}
        lookups = cache["hits"] + cache["misses"]
        totals["prefix_cache"] = {**cache, "hit_rate": cache["hits"] / lookups if lookups else 0.0}
        return {**totals, "router": snapshot.get("router", {}), "model_replicas": replicas}

    async def invalidate(self) -> int:
        raise APIError(501, "with prefix routing each model replica holds its own prefix cache and Serve cannot "
                       "address one replica: redeploy the app to drop them all", type="server_error",
                       code="not_implemented")


def _unwrap(err: BaseException) -> BaseException:
    """The :class:`APIError` a model replica raised (Ray wraps it), or a 503 when Serve's queue for the
    model replicas is full; anything else unchanged (→ 500)."""
    from ray.serve.exceptions import BackPressureError

    for candidate in (getattr(err, "cause", None), err):  # the replica's own error, not Ray's wrapper
        if isinstance(candidate, APIError):
            return candidate
    if isinstance(err, BackPressureError):
        return APIError(503, "server busy: too many requests queued for the model replicas; retry shortly",
                        type="server_error", code="overloaded", headers={"Retry-After": "1"})
    return err
