"""``nanochat serve``: start the OpenAI-compatible Serve app (chat UI at /) on a checkpoint.

The short path to ``serve run serve_configs/local.yaml``: without ``RAY_ADDRESS`` it starts an
embedded local Ray and blocks until Ctrl-C or SIGTERM (the app lives as long as this process); with
``RAY_ADDRESS`` it deploys to that cluster and returns unless ``--blocking``. Stopping drains the app
first (in-flight streams get up to ``DRAIN_S`` to finish), then stops Serve and Ray, all within
:data:`nanochat.ray_stop.STOP_TIMEOUT_S` (see :func:`nanochat.ray_stop.stop_on_signals`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from nanochat.commands.config import add_console_args
from nanochat.common import NanochatError, get_logger
from nanochat.ray_stop import STOP_TIMEOUT_S, on_stop

log = get_logger(__name__)

# Seconds a stopping replica waits for in-flight requests before it is killed (Serve's
# graceful_shutdown_timeout_s, 20 s by default: too long for the stop bound).
DRAIN_S = 6.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint: OpenAI-compatible API at /v1, chat UI at /",
        description=(
            "Serve a checkpoint with Ray Serve (continuous batching, streaming, OpenAI API, web UI). "
            f"Ctrl-C or SIGTERM stops it within {STOP_TIMEOUT_S:.0f} s: in-flight streams get {DRAIN_S:.0f} s "
            "to finish, then Serve and the local Ray are shut down (their processes killed if they hang)."
        ),
    )
    p.add_argument("--config", help="a Serve config YAML (e.g. serve_configs/local.yaml); flags below override it")
    p.add_argument("--checkpoint", help="checkpoint path, tag dir, or stage (sft|mid|base); default: newest")
    p.add_argument("--preset", help="preset supplying the `serve` section (default: tiny, or the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serve setting, e.g. --set max_batch_size=8 (repeatable)")
    p.add_argument("--replicas", type=parse_replicas, metavar="MIN:MAX",
                   help="engine replicas: N (fixed) or MIN:MAX (autoscaled on ongoing requests; MIN 0 = scale to "
                        "zero). Default: 1:2 on a CPU machine, 1:<GPUs> on a GPU one, the preset's with RAY_ADDRESS "
                        "or --config. Above 1, requests are routed by prefix affinity (--set router=power_of_two: "
                        "Serve's default)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--api-key", help="require this Bearer token (default: $NANOCHAT_API_KEY; none = open)")
    p.add_argument("--blocking", action="store_true", help="with RAY_ADDRESS: stay in the foreground")
    add_console_args(p)
    p.set_defaults(func=_serve, uses_ray=True)


def parse_replicas(text: str) -> tuple[int, int]:
    """``"N"`` → ``(N, N)``; ``"MIN:MAX"`` → ``(MIN, MAX)`` with 0 <= MIN <= MAX and MAX >= 1."""
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use N or MIN:MAX, e.g. 2 or 1:4") from None
    if low < 0 or high < max(low, 1):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def _default_replicas() -> tuple[int, int]:
    """1:2 on a CPU machine (room to scale under load), 1:<GPUs> with GPUs (one GPU per replica)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (1, gpus) if gpus else (1, 2)


def _deployment_entry(app_cfg: dict[str, Any], name: str, first: bool = False) -> dict[str, Any]:
    """The config's ``deployments:`` entry called ``name`` (or the first unnamed/only one if ``first``)."""
    entries = app_cfg.get("deployments") or []
    for entry in entries:
        if entry.get("name") == name:
            return dict(entry)
    return dict(entries[0]) if first and len(entries) == 1 and not entries[0].get("name") else {}


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    file = Path(path)
    if not file.exists():
        raise NanochatError(f"serve config {file} does not exist (try serve_configs/local.yaml)")
    config = yaml.safe_load(file.read_text()) or {}
    apps = config.get("applications") or []
    if len(apps) != 1 or "nanochat.serve.app:build_app" not in str(apps[0].get("import_path")):
        raise NanochatError(
            f"{file}: nanochat serve runs one application with import_path nanochat.serve.app:build_app; "
            "use `serve run` for other configs"
        )
    return config


def _serve(args: argparse.Namespace) -> int:
    from ray import serve

    from nanochat.checkpoint import resolve_checkpoint
    from nanochat.ray_utils import init_ray
    from nanochat.serve.app import build_app_with

    config = _load_config(args.config)
    app_cfg = (config.get("applications") or [{}])[0]
    build_args = dict(app_cfg.get("args") or {})
    if args.checkpoint:
        build_args["checkpoint"] = args.checkpoint
    if args.preset:
        build_args["preset"] = args.preset
    replicas = args.replicas or (None if args.config or os.environ.get("RAY_ADDRESS") else _default_replicas())
    extra = [f"min_replicas={replicas[0]}", f"max_replicas={replicas[1]}"] if replicas else []
    if args.overrides or extra:
        build_args["overrides"] = list(build_args.get("overrides") or []) + extra + args.overrides
    api_key = args.api_key or os.environ.get("NANOCHAT_API_KEY")
    if api_key:
        build_args["api_key"] = api_key
    http = dict(config.get("http_options") or {})
    http["host"] = args.host or http.get("host", "127.0.0.1")
    http["port"] = args.port or http.get("port", 8000)
    from nanochat.serve.build import DEPLOYMENT, INGRESS

    deployment = _deployment_entry(app_cfg, DEPLOYMENT, first=True)
    if replicas:  # the flag wins over the config's replica bounds
        deployment["autoscaling_config"] = {**(deployment.get("autoscaling_config") or {}),
                                            "min_replicas": replicas[0], "initial_replicas": max(replicas[0], 1),
                                            "max_replicas": replicas[1]}
        deployment.pop("num_replicas", None)
    deployment.setdefault("graceful_shutdown_timeout_s", DRAIN_S)
    deployment.setdefault("graceful_shutdown_wait_loop_s", 0.5)  # notice a drained replica quickly

    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if not on_cluster:
        resolve_checkpoint(build_args.get("checkpoint"))  # fail fast, before starting Ray
    init_ray()
    # resolves the checkpoint: fails fast if none
    application = build_app_with(build_args, deployment, _deployment_entry(app_cfg, INGRESS))
    name, prefix = app_cfg.get("name", "nanochat"), app_cfg.get("route_prefix", "/")
    if not on_cluster or args.blocking:
        # On stop (also during start-up: the app may already answer), deleting the app first drains
        # it: replicas finish in-flight requests (up to DRAIN_S) while the proxies still stream them.
        # On a cluster only this app goes; other apps and Serve stay.
        on_stop(lambda: serve.delete(name))
        if not on_cluster:
            on_stop(serve.shutdown)
    serve.start(http_options=http)
    serve.run(application, name=name, route_prefix=prefix, blocking=False)
    url = f"http://{http['host']}:{http['port']}{prefix.rstrip('/')}"
    print(f"nanochat is serving at {url}/ (chat UI) and {url}/v1 (OpenAI API)" + (" [API key required]" if api_key else ""))
    if on_cluster and not args.blocking:
        print(f"deployed application '{name}' to the cluster; `serve status` shows it, `serve shutdown` stops it")
        return 0
    print("press Ctrl-C to stop", flush=True)
    while True:  # Ctrl-C / SIGTERM raise KeyboardInterrupt here; stop_on_signals does the rest
        time.sleep(3600)
