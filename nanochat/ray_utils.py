"""Starting or joining Ray: a cluster when ``RAY_ADDRESS`` is set, else an embedded local Ray.

The embedded default overcommits logical CPUs (2 cores → 4 logical CPUs) because Ray Data's
file listing needs a whole free CPU while Train workers hold theirs, which deadlocks on a
2-core machine. Environment that DeepSpeed and Train need inside workers is set here once and
passed through the runtime env. The console (dashboard URL, worker output) is
:mod:`nanochat.ray_console`; stopping on Ctrl-C/SIGTERM is :mod:`nanochat.ray_stop`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
from pathlib import Path

from nanochat.common import base_dir, get_logger
from nanochat.ray_console import (
    dashboard_enabled,
    dashboard_line,
    dashboard_url,
    route_worker_output,
    worker_output_filterable,
)
from nanochat.ray_stop import raise_interrupt, track_session

log = get_logger(__name__)

def extensions_dir() -> str:
    """Where this Python environment's compiled torch extensions go: ``~/.cache/torch_extensions/<env>-<hash>``."""
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    return str(Path.home() / ".cache" / "torch_extensions" / f"{Path(sys.prefix).name}-{key}")


def worker_env(base: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment variables every Ray worker needs (DeepSpeed on CPU, cached compiled ops and graphs).

    Not the artifacts root: code in workers gets it in its typed config (``WorkerConfig.base_dir``,
    an eval shard's payload, a Tune trial's config); ``base`` here only places the compile cache.
    """
    env = {
        # Reports cost ~2 s each with the default 2 s controller poll; 0.1 s makes them cheap.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        # DeepSpeed's compiled ops, one folder per Python environment: two venvs sharing one folder rebuild
        # them in turn (~40 s each time), since each build names the other venv's sources.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", extensions_dir()),
        # torch.compile's on-disk caches (FX graphs, AOTAutograd): a resumed run reuses the generated code.
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                                  str(base_dir(base) / "cache" / "torch_compile")),
        "TOKENIZERS_PARALLELISM": "false",
        # Ray Data lists parquet files through a pool of footer-reading actors, 32 by default: 32 Python
        # processes (~200 MB each) per listing, the bulk of a pretraining run's peak on a small node.
        "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": os.environ.get("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2"),
    }
    if "DS_ACCELERATOR" in os.environ:
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    else:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    return env


# Ray's state API and job client find "their" Ray from RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, else by
# scanning the host for GCS processes, which fails ("Found multiple active Ray instances") or picks the
# wrong one when a second Ray runs here. The embedded Ray gives its driver and workers its dashboard's URL.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
DASHBOARD_PORT = 8265  # Ray's default; the next free one when taken, as Ray itself does
NO_API_SERVER = "http://127.0.0.1:1"  # dashboard off: nothing listens on port 1, so queries fail at once


def init_ray(num_cpus: int | None = None, quiet: bool = True, base: str | os.PathLike | None = None) -> dict:
    """Start or join Ray (idempotent). Returns ``ray.cluster_resources()``. ``base``: see :func:`worker_env`.

    The local Ray starts the dashboard on 127.0.0.1 (port 8265 or the next free one) unless
    ``NANOCHAT_DASHBOARD=0`` (``--no-dashboard``); its URL and the session's log directory are
    printed once. ``RAY_API_SERVER_ADDRESS`` is set to its URL (an unreachable one without a dashboard)
    in every worker's environment, so Ray's state API (Train's state actor uses it) reaches this Ray even when
    another one runs on the host. ``quiet`` (unless ``NANOCHAT_VERBOSE=1``, ``-v``): workers' output
    stays in those log files and only nanochat's warnings and errors from workers reach the console
    (:mod:`nanochat.ray_console`).
    """
    import ray

    from nanochat.progress import verbose

    quiet = quiet and not verbose()
    env = worker_env(base)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return ray.cluster_resources()
    dashboard = dashboard_enabled()
    if dashboard or os.environ.get("RAY_ADDRESS"):  # a cluster has its own dashboard
        # Train runs appear in the dashboard's Train view only with Train's state actor.
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    filtered = quiet and worker_output_filterable()
    session_dir, api_server, port_chosen = None, None, False
    handler = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit, joining or starting
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime env is fixed; passing ours would fail to merge.
        context = ray.init(log_to_driver=filtered or not quiet, logging_level="WARNING" if quiet else "INFO")
        where = f"joined Ray cluster at {os.environ['RAY_ADDRESS']}"
    else:
        cores = os.cpu_count() or 2
        num_cpus = num_cpus or max(4, 2 * cores)
        # Nothing preempts the nodes of a local Ray: Train's preemption watcher would be one more process.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        port = free_dashboard_port() if dashboard else None
        # Without a dashboard there is no state API here: an unreachable address makes Ray's internal
        # queries fail fast instead of asking another Ray on the host, whose "no such actor" made Train's
        # placement-group cleaner remove our training workers' placement group (seen in CI).
        # Our workers' environment only: in this process's it would reach its subprocesses, and
        # `ray job submit --address X` honours RAY_API_SERVER_ADDRESS before its own --address.
        api_server = f"http://127.0.0.1:{port}" if port is not None else NO_API_SERVER
        env[API_SERVER_ENV], port_chosen = api_server, port is not None
        context = ray.init(
            address="local",  # a new embedded cluster even when a `ray start` cluster runs on this host
            num_cpus=num_cpus,
            include_dashboard=None if dashboard else False,  # None: start it, but never fail ray.init over it
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": env},
            log_to_driver=filtered or not quiet,
            logging_level="WARNING" if quiet else "INFO",
            configure_logging=True,
        )
        node = getattr(ray._private.worker, "_global_node", None)
        session_dir = node.get_session_dir_path() if node is not None else None
        where = f"started a local Ray ({num_cpus} logical CPUs on {cores} cores)"
    if handler is raise_interrupt:  # keep the command's own (a `ray job stop` too must abort the Train run)
        signal.signal(signal.SIGTERM, handler)
    track_session(session_dir)
    route_worker_output(filtered, quiet)
    url = getattr(context, "dashboard_url", None)
    log.info("%s; %s", where, dashboard_line(url, dashboard or bool(os.environ.get("RAY_ADDRESS"))))
    if port_chosen and api_server != dashboard_url():  # its port was taken meanwhile (a race)
        log.warning("%s=%s is not this Ray's dashboard (%s): Ray's state API may ask another Ray",
                    API_SERVER_ENV, api_server, dashboard_url() or "none started")
    if session_dir:
        log.info("Ray's own logs: %s", Path(session_dir) / "logs")
    return ray.cluster_resources()


def free_dashboard_port(host: str = "127.0.0.1", first: int = DASHBOARD_PORT, tries: int = 50) -> int | None:
    """The first port from ``first`` that ``host`` can bind (Ray's own test: SO_REUSEADDR), else None."""
    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    return None


def cluster_has_gpus() -> bool:
    """Whether the connected Ray has any GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
