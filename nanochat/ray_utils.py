"""Connecting to Ray: a cluster when ``RAY_ADDRESS`` is set, else an embedded local Ray.

The embedded default overcommits logical CPUs (2 cores → 4 logical CPUs) because Ray Data's
file listing needs a whole free CPU while Train workers hold theirs, which deadlocks on a
2-core machine. Environment that DeepSpeed and Train need inside workers is set here once and
passed through the runtime env.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanochat.common import base_dir, get_logger

log = get_logger(__name__)


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker needs (DeepSpeed on CPU, cached compiled ops)."""
    env = {
        # Reports cost ~2 s each with the default 2 s controller poll; 0.1 s makes them cheap.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
        "NANOCHAT_BASE_DIR": str(base_dir()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if "DS_ACCELERATOR" in os.environ:
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    else:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    return env


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> dict:
    """Start or join Ray (idempotent). Returns ``ray.cluster_resources()``."""
    import ray

    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return ray.cluster_resources()
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime env is fixed; passing ours would fail to merge.
        ray.init(log_to_driver=not quiet or True)
        log.info("joined Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        cores = os.cpu_count() or 2
        num_cpus = num_cpus or max(4, 2 * cores)
        ray.init(
            address="local",  # a new embedded cluster even when a `ray start` cluster runs on this host
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": worker_env()},
            logging_level="WARNING" if quiet else "INFO",
            configure_logging=True,
        )
        log.info("started a local Ray (%d logical CPUs on %d cores)", num_cpus, cores)
    return ray.cluster_resources()


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
