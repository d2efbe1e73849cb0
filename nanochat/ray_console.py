"""The console of a command that uses Ray: the dashboard's URL, and Ray's output kept to its log files.

Quiet (the default): workers' output stays in Ray's log files and only nanochat's warnings and
errors from workers reach the console; Ray Data's INFO lines stay in ``ray-data.log``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

DASHBOARD_ENV = "NANOCHAT_DASHBOARD"
# A worker line that reaches the console in quiet mode: a nanochat warning/error log line, or a Python
# warning raised in nanochat's code (everything else stays in the worker's log file).
_WORKER_LINE_SHOWN = re.compile(r"\b(WARNING|ERROR|CRITICAL) nanochat[\w.]*:|nanochat/\S+:\d+: \w*Warning:")


def dashboard_enabled() -> bool:
    """Whether the local Ray starts its dashboard: yes unless ``NANOCHAT_DASHBOARD`` is 0/false/no/off."""
    return os.environ.get(DASHBOARD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def dashboard_url() -> str | None:
    """The Ray dashboard of the Ray this process is connected to (``http://host:port``), else None."""
    worker = sys.modules.get("ray._private.worker")
    node = getattr(worker, "_global_node", None) if worker is not None else None
    url = getattr(node, "webui_url", None) if node is not None else None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def dashboard_line(url: str | None, wanted: bool) -> str:
    """The line that says where the dashboard is (and that it wants the token), or why there is none."""
    if not url:
        return "the Ray dashboard did not start (see Ray's logs)" if wanted else \
            "Ray dashboard off (NANOCHAT_DASHBOARD=0 or --no-dashboard)"
    url = url if "://" in url else f"http://{url}"
    token = ""
    with contextlib.suppress(Exception):
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        token = " (it asks for the token `ray get-auth-token` prints)" if is_token_auth_enabled() else ""
    return f"Ray dashboard: {url}{token}"


def worker_output_filterable() -> bool:
    """Whether this Ray lets the driver choose which worker lines to print (else quiet prints none)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher  # noqa: F401
    except ImportError:  # a Ray without it: quiet means no worker output at all
        return False
    return True


def _filter_worker_output() -> None:
    """Replace Ray's printer of worker output (same handler name, so ``ray.shutdown`` removes ours), and
    mute the raylet's notices on the driver (worker-pool size, retried tasks of a finished dataset):
    the raylet and the workers keep them in their own log files, and a failure that matters reaches
    the command as an exception anyway."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", forward_worker_warnings)
    _ray_prints_worker_output(False)


def _ray_prints_worker_output(on: bool) -> None:
    """Ray's own switch for printing worker output and raylet notices on the driver (its debugger uses it)."""
    worker = sys.modules.get("ray._private.worker")
    if worker is not None and hasattr(worker, "_worker_logs_enabled"):
        worker._worker_logs_enabled = on


def forward_worker_warnings(batch: dict) -> None:
    """Print the lines of one batch of worker output that need the user (nanochat's warnings and
    errors), prefixed with the actor or task that wrote them; Ray keeps every line in its log files."""
    from nanochat.progress import write

    who = batch.get("actor_name") or batch.get("task_name") or f"pid={batch.get('pid')}"
    for line in batch.get("lines") or []:
        if _WORKER_LINE_SHOWN.search(line):
            write(f"({who}) {line}")


def _quiet_driver_loggers() -> None:
    """Ray Data prints INFO lines (dataset execution plans, progress notes) on the driver's console;
    keep them in its log file (``ray-data.log``) only."""
    import logging

    import ray.data  # noqa: F401 - configures the "ray.data" logger's handlers (import order matters)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def route_worker_output(filtered: bool, quiet: bool) -> None:
    """After ``ray.init``: show only nanochat's warnings of workers (``filtered``), or everything Ray
    prints; ``quiet`` also keeps Ray Data's INFO lines off the driver's console."""
    if filtered:
        _filter_worker_output()
    else:
        _ray_prints_worker_output(True)  # a quiet Ray earlier in this process muted it
    if quiet:
        _quiet_driver_loggers()
