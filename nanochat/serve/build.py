"""Building the Serve application: ``args`` of a Serve config → the bound deployments.

``build_app(args)`` is the ``import_path`` target of ``serve run`` / ``serve deploy`` configs
(``nanochat.serve.app:build_app``, re-exported there); :class:`ServerSettings` is what each replica
receives. The layout (see :mod:`nanochat.serve.app`) follows the ``serve`` settings: with
``max_replicas > 1`` and ``router: prefix``, an ingress (``NanochatIngress``) routes to the engine
replicas (``NanochatServer``) by prefix affinity; otherwise ``NanochatServer`` alone is ingress and model.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve

from nanochat.config import ServeSettings
from nanochat.serve.backend import DEPLOYMENT


class ServerSettings(ServeSettings):
    """What a replica needs: the preset's ``serve`` section plus the checkpoint and device."""

    checkpoint: str
    device: str | None = None
    model_id: str | None = None  # the checkpoint's tag and context, read by the builder so that an
    context_len: int | None = None  # ingress without the model can answer /v1/models


class BuildArgs(BaseModel):
    """``args`` of a Serve config (or ``nanochat serve`` flags)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = None  # path, tag dir, stage name (sft|mid|base) or None (latest)
    preset: str = "tiny"
    overrides: list[str] = []  # ``serve.max_batch_size=8`` style, like ``--set``
    api_key: str | None = None
    device: str | None = None
    base_dir: str | None = None  # artifacts root where checkpoint names are looked up (None: $NANOCHAT_BASE_DIR)


CPU_REPLICA_CPUS = 0.5  # logical CPUs of a CPU engine replica
INGRESS = "NanochatIngress"  # the HTTP front of the prefix-routing layout (no model)
ROUTER = {  # the engine replicas' request router in that layout (a config's deployments: entry may override)
    "request_router_class": "nanochat.serve.router.PrefixAffinityRouter",
    "request_router_kwargs": {},
    "request_routing_stats_period_s": 2.0,  # how often replicas report their load and prefix cache
}


def deployment_options(serve_settings: Any, num_gpus: float) -> dict[str, Any]:
    """Serve deployment options from the preset's ``serve`` section."""
    s = serve_settings
    return {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "initial_replicas": max(s.min_replicas, 1),  # start ready; scale to zero only when idle
            "max_replicas": max(s.max_replicas, s.min_replicas),
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "metrics_interval_s": 2.0,
            "look_back_period_s": 10.0,
        },
        # A CPU replica asks for half a logical CPU (Ray still gives it one torch thread, see
        # serve.cpu_threads) so that several fit beside Serve's actors on a small machine.
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": 0 if num_gpus else CPU_REPLICA_CPUS},
    }


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run module:build_app`` and YAML ``import_path`` (one dict arg)."""
    return build_app_with(args)


def build_app_with(args: dict[str, Any] | None = None, deployment: dict[str, Any] | None = None,
                   ingress: dict[str, Any] | None = None) -> serve.Application:
    """:func:`build_app` plus option overrides for the ``NanochatServer`` (``deployment``) and
    ``NanochatIngress`` (``ingress``) deployments: what a config's ``deployments:`` entries do under
    ``serve run``; used by ``nanochat serve --config``. A ``deployment`` override of
    ``autoscaling_config.max_replicas`` or ``num_replicas`` counts when choosing the layout."""
    from nanochat.checkpoint import checkpoint_tag, read_meta, resolve_checkpoint
    from nanochat.common import base_dir
    from nanochat.config import load_preset

    parsed = BuildArgs.model_validate(args or {})
    overrides = [o if o.startswith("serve.") else f"serve.{o}" for o in parsed.overrides]
    settings = load_preset(parsed.preset, overrides).serve
    # Replicas get an absolute checkpoint path: they never look at the artifacts root themselves.
    checkpoint = str(resolve_checkpoint(parsed.checkpoint, base=base_dir(parsed.base_dir)).resolve())
    api_key = parsed.api_key or settings.api_key or os.environ.get("NANOCHAT_API_KEY") or None
    num_gpus = settings.num_gpus if settings.num_gpus is not None else _default_gpus()
    meta = read_meta(checkpoint)
    replica = ServerSettings(
        **settings.model_dump(exclude={"api_key"}), checkpoint=checkpoint, api_key=api_key, device=parsed.device,
        model_id=checkpoint_tag(checkpoint, meta), context_len=(meta.get("model_config") or {}).get("sequence_len"),
    )
    options = _merged(deployment_options(settings, num_gpus), deployment)
    if "num_replicas" in (deployment or {}):
        options.pop("autoscaling_config", None)  # Serve takes one or the other
    from nanochat.serve.app import NanochatModel, NanochatServer  # not at the top: app imports this module

    if settings.router != "prefix" or _max_replicas(options) <= 1:
        return NanochatServer.options(**options).bind(replica.model_dump())
    options["request_router_config"] = _merged(ROUTER, options.get("request_router_config"))
    model = NanochatModel.options(name=DEPLOYMENT, **options).bind(replica.model_dump())
    return NanochatServer.options(name=INGRESS, **_merged(ingress_options(settings, options), ingress)).bind(
        replica.model_dump(), model)


def ingress_options(settings: Any, model_options: dict[str, Any]) -> dict[str, Any]:
    """The prefix-routing ingress: one replica, no CPU reserved (it parses JSON and relays SSE, like
    Serve's proxy), room for every request the engine replicas can hold or queue, and the same drain."""
    per_replica = model_options.get("max_ongoing_requests", settings.max_ongoing_requests)
    queued = max(model_options.get("max_queued_requests", settings.max_queued_requests), 0)
    drain = {k: v for k, v in model_options.items() if k.startswith("graceful_shutdown")}
    return {"num_replicas": 1, "max_ongoing_requests": _max_replicas(model_options) * per_replica + queued,
            "ray_actor_options": {"num_cpus": 0}, **drain}


def _max_replicas(options: dict[str, Any]) -> int:
    if isinstance(options.get("num_replicas"), int):
        return options["num_replicas"]
    return int((options.get("autoscaling_config") or {}).get("max_replicas", 1))


def _merged(options: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with ``overrides`` applied (dict values merged one level deep; ``name`` ignored)."""
    out = dict(options)
    for key, value in (overrides or {}).items():
        if key == "name":
            continue
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
