"""Building the Serve application: ``args`` of a Serve config → a bound ``NanochatServer``.

``build_app(args)`` is the ``import_path`` target of ``serve run`` / ``serve deploy`` configs
(``nanochat.serve.app:build_app``, re-exported there); :class:`ServerSettings` is what each replica
receives.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve

from nanochat.config import ServeSettings


class ServerSettings(ServeSettings):
    """What a replica needs: the preset's ``serve`` section plus the checkpoint and device."""

    checkpoint: str
    device: str | None = None


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
    from nanochat.serve.app import NanochatServer  # not at the top: app imports this module

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
