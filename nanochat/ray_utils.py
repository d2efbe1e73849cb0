"""Connecting to Ray: a cluster when ``RAY_ADDRESS`` is set, else an embedded local Ray.

The embedded default overcommits logical CPUs (2 cores → 4 logical CPUs) because Ray Data's
file listing needs a whole free CPU while Train workers hold theirs, which deadlocks on a
2-core machine. Environment that DeepSpeed and Train need inside workers is set here once and
passed through the runtime env.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nanochat.common import NanochatError, base_dir, get_logger

log = get_logger(__name__)

# How long Ctrl-C / SIGTERM may take to stop a command and the Ray it started (docs/troubleshooting.md).
STOP_TIMEOUT_S = 15.0
_KILL_GRACE_S = 1.0  # SIGTERM, then SIGKILL after this long

_session_dir: str | None = None  # the embedded Ray this process started (None: none, or a joined cluster)
_stop_hooks: list[Callable[[], None]] = []  # graceful steps before ray.shutdown, in order


def worker_env(base: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment variables every Ray worker needs (DeepSpeed on CPU, cached compiled ops and graphs).

    Not the artifacts root: code in workers gets it in its typed config (``WorkerConfig.base_dir``,
    an eval shard's payload, a Tune trial's config); ``base`` here only places the compile cache.
    """
    env = {
        # Reports cost ~2 s each with the default 2 s controller poll; 0.1 s makes them cheap.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
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


def init_ray(num_cpus: int | None = None, quiet: bool = True, base: str | os.PathLike | None = None) -> dict:
    """Start or join Ray (idempotent). Returns ``ray.cluster_resources()``. ``base``: see :func:`worker_env`.

    The local Ray starts the dashboard on 127.0.0.1 (port 8265 or the next free one) unless
    ``NANOCHAT_DASHBOARD=0`` (``--no-dashboard``); its URL and the session's log directory are
    printed once. ``quiet`` (unless ``NANOCHAT_VERBOSE=1``, ``-v``): workers' output stays in those
    log files and only nanochat's warnings and errors from workers reach the console
    (:mod:`nanochat.progress`).
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
    filtered = quiet and _can_filter_worker_output()
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job's runtime env is fixed; passing ours would fail to merge.
        context = ray.init(log_to_driver=filtered or not quiet, logging_level="WARNING" if quiet else "INFO")
        where = f"joined Ray cluster at {os.environ['RAY_ADDRESS']}"
    else:
        cores = os.cpu_count() or 2
        num_cpus = num_cpus or max(4, 2 * cores)
        # Nothing preempts the nodes of a local Ray: Train's preemption watcher would be one more process.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        handler = signal.getsignal(signal.SIGTERM)
        context = ray.init(
            address="local",  # a new embedded cluster even when a `ray start` cluster runs on this host
            num_cpus=num_cpus,
            include_dashboard=None if dashboard else False,  # None: start it, but never fail ray.init over it
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env},
            log_to_driver=filtered or not quiet,
            logging_level="WARNING" if quiet else "INFO",
            configure_logging=True,
        )
        if handler is _raise_interrupt:  # ray.init replaces it with sys.exit; keep the command's own
            signal.signal(signal.SIGTERM, handler)
        global _session_dir
        node = getattr(ray._private.worker, "_global_node", None)
        _session_dir = node.get_session_dir_path() if node is not None else None
        where = f"started a local Ray ({num_cpus} logical CPUs on {cores} cores)"
    if filtered:
        _filter_worker_output()
    else:
        _ray_prints_worker_output(True)  # a quiet Ray earlier in this process muted it
    if quiet:
        _quiet_driver_loggers()
    url = getattr(context, "dashboard_url", None)
    log.info("%s; %s", where, _dashboard_line(url, dashboard or bool(os.environ.get("RAY_ADDRESS"))))
    if _session_dir:
        log.info("Ray's own logs: %s", Path(_session_dir) / "logs")
    return ray.cluster_resources()


# ---- the console: dashboard URL, and Ray's output kept to its log files ---------------------------

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


def _dashboard_line(url: str | None, wanted: bool) -> str:
    if not url:
        return "the Ray dashboard did not start (see Ray's logs)" if wanted else \
            "Ray dashboard off (NANOCHAT_DASHBOARD=0 or --no-dashboard)"
    url = url if "://" in url else f"http://{url}"
    token = ""
    with contextlib.suppress(Exception):
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        token = " (it asks for the token `ray get-auth-token` prints)" if is_token_auth_enabled() else ""
    return f"Ray dashboard: {url}{token}"


def _can_filter_worker_output() -> bool:
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


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


# ---- stopping: Ctrl-C and SIGTERM end a command and everything its Ray started, in bounded time -------


def on_stop(hook: Callable[[], None]) -> None:
    """Run ``hook`` (e.g. drain a Serve app) before Ray is shut down when the command ends (in order)."""
    _stop_hooks.append(hook)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ignore(signum: int, frame: Any) -> None:
    """Installed while stopping: the signal still reaches the watcher through the wakeup fd."""


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # a command that never imported ray started none
    return bool(ray is not None and ray.is_initialized())


@contextlib.contextmanager
def stop_on_signals(timeout_s: float = STOP_TIMEOUT_S) -> Iterator[None]:
    """Run a command so that Ctrl-C and SIGTERM stop it, and the Ray it started, within ``timeout_s``.

    SIGTERM raises :class:`KeyboardInterrupt` like SIGINT, so the command unwinds the same way (a
    server, a training run and an eval all stop at once; Ray Train's own SIGINT handler, which
    aborts the run and exits, ends as an interrupt too). The countdown starts at the first signal,
    whoever handles it (a wakeup fd sees every signal); on the way out, whether the command
    finished, failed or was interrupted, a Ray that this block started (not one already running in
    the process) is stopped: the :func:`on_stop` hooks, then ``ray.shutdown()``. Past the deadline,
    at a second Ctrl-C/SIGTERM, or when the GCS/raylet died (a SIGTERM to the whole process group),
    a watchdog kills every process of that embedded Ray session (found by process tree and by files
    open under its session dir, never by name) and exits the process at once: code 130 after a
    signal, 2 after a NanochatError, 1 after another error, else 0 (Ray's own exit hooks could hang
    again). A joined cluster (``RAY_ADDRESS``) is only disconnected from, never killed. (The
    interpreter's own exit can still hang in Ray's native code: :func:`nanochat.cli.main` ends a
    Ray command's process with ``os._exit``.)
    """
    in_main = threading.current_thread() is threading.main_thread()
    already_running = _ray_running()
    stopper = _Stopper(timeout_s)
    tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Tune would turn Ctrl-C into a slow wind-down
    previous = (signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, _raise_interrupt)) if in_main else None
    if in_main:
        stopper.listen()
    try:
        yield
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) or stopper.signals:
            stopper.exit_code = 130
            if not isinstance(err, KeyboardInterrupt):  # e.g. Ray Train's SIGINT handler calls sys.exit(0)
                raise KeyboardInterrupt from None
        else:
            stopper.exit_code = 2 if isinstance(err, NanochatError) else 1  # what the CLI exits with
        raise
    else:
        if stopper.signals:  # a handler (Train's, Tune's) swallowed the signal: still an interrupt
            raise KeyboardInterrupt
    finally:
        try:
            if not already_running and _ray_running():
                if stopper.listening:  # a second signal now goes to the watcher (kill at once), not here
                    signal.signal(signal.SIGINT, _ignore)
                    signal.signal(signal.SIGTERM, _ignore)
                stopper.stop_ray()
        finally:
            stopper.close()
            _stop_hooks.clear()
            if tune_sigint is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            if in_main:  # also undoes Ray Train's SIGINT handler, which it never removes
                signal.signal(signal.SIGINT, previous[0])
                signal.signal(signal.SIGTERM, previous[1])


class _Stopper:
    """The countdown, watchdog and kill of one :func:`stop_on_signals` block."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline: float | None = None  # set at the first signal, or when the command ends
        self.signals = 0
        self.exit_code = 0
        self.ours: list = []  # processes of our Ray session, snapshot when the countdown starts
        self.done, self.draining = threading.Event(), threading.Event()
        self._lock, self._forcing = threading.Lock(), threading.Lock()
        self._socks: tuple[socket.socket, socket.socket] | None = None
        self._old_fd = -1

    @property
    def listening(self) -> bool:
        return self._socks is not None

    def listen(self) -> None:
        """See every signal the process receives, whichever Python handler runs (main thread only)."""
        read, write = socket.socketpair()
        write.setblocking(False)
        try:
            self._old_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        except ValueError:
            read.close(), write.close()
            return
        self._socks = (read, write)
        threading.Thread(target=self._watch, args=(read,), name="signal-watch", daemon=True).start()

    def _watch(self, read: socket.socket) -> None:
        while True:
            try:
                data = read.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                self.signals += 1
                if self.signals == 1:
                    self.exit_code = 130
                    self.arm()
                else:
                    self.force("interrupted again", 130)

    def close(self) -> None:
        self.done.set()
        if self._socks is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._old_fd)
            self._socks[1].close()  # the watcher sees EOF and ends
            self._socks[0].close()
            self._socks = None

    def arm(self) -> None:
        """Start the countdown (once) and the watchdog that enforces it."""
        with self._lock:
            if self.deadline is not None:
                return
            self.deadline = time.monotonic() + self.timeout_s
        # Snapshot now: once the raylet is gone its workers are no longer our descendants.
        self.ours = _session_processes(_session_dir) if _session_dir and _ray_running() else []
        threading.Thread(target=self._watchdog, name="ray-stop-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        fire_at = self.deadline - 2 * _KILL_GRACE_S - 1.0  # room to kill and exit inside the bound
        while not self.done.wait(0.2):
            if time.monotonic() >= fire_at and (_ray_running() or self.ours):
                self.force("Ray shutdown did not finish in time", self.exit_code)
            # A SIGTERM to the whole process group (e.g. systemd) also stops our GCS and raylet:
            # nothing graceful can work then, so do not wait for the deadline.
            node = _local_node()
            with contextlib.suppress(Exception):  # the watchdog itself must never die
                if self.draining.is_set() and node is not None and not node.remaining_processes_alive():
                    self.force("Ray lost its GCS/raylet", self.exit_code)

    def stop_ray(self) -> None:
        """Drain (hooks), ``ray.shutdown()``, then kill whatever of our session is left."""
        global _session_dir
        self.arm()
        if self.exit_code == 130:
            print(f"shutting down (at most {self.timeout_s:.0f} s; Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        try:
            import ray

            self.draining.set()
            for hook in list(_stop_hooks):
                try:
                    hook()
                except KeyboardInterrupt:
                    raise
                except Exception as err:  # noqa: BLE001 - a failed drain must not keep Ray running
                    log.warning("stop hook failed: %s", err)
            self.draining.clear()  # ray.shutdown() itself stops the node's processes
            ray.shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: stop now
            self.force("interrupted again", 130)
        if _session_dir:  # workers still exiting, or stuck: the watchdog still guards the deadline
            left = [p for p in _session_processes(_session_dir) + self.ours if _alive(p)]
            if left:
                _kill(left, min(_KILL_GRACE_S, max(0.2, (self.deadline - time.monotonic() - 1.0) / 2)))
        self.done.set()
        _session_dir = None

    def force(self, why: str, exit_code: int) -> None:
        """Kill our Ray session's processes and exit now (any thread)."""
        if not self._forcing.acquire(blocking=False):  # another thread is already at it
            return
        print(f"\n{why}: " + ("killing the local Ray's processes" if _session_dir else "exiting now"),
              file=sys.stderr, flush=True)
        if _session_dir:
            _kill([p for p in _session_processes(_session_dir) + self.ours if _alive(p)], _KILL_GRACE_S)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(exit_code)  # a hung shutdown (and Ray's atexit hook) must not keep the process alive


def _local_node():
    """The embedded Ray node this process started (its GCS, raylet, agents), else None."""
    worker = sys.modules.get("ray._private.worker")  # may be mid-import in another thread
    return getattr(worker, "_global_node", None) if worker is not None and _session_dir else None


def _session_processes(session: str) -> list:
    """Processes of the embedded Ray session at ``session``: our descendants (GCS, raylet, agents,
    workers) and any process holding a file open under the session dir (workers whose raylet died
    have been re-parented, but still hold their log files). Never chosen by name: other Ray clusters
    run on the same machine."""
    import psutil

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid == me.pid:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if any(f.path.startswith(session) for f in proc.open_files()):
                found[proc.pid] = proc
    return list(found.values())


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(procs: list, grace_s: float) -> None:
    """SIGTERM ``procs``, then SIGKILL whatever is still alive after ``grace_s``."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
