"""Stopping: Ctrl-C and SIGTERM end a command and everything its Ray started, in bounded time.

:func:`stop_on_signals` wraps every command that uses Ray (:func:`nanochat.cli.main`); the embedded
Ray that :func:`nanochat.ray_utils.init_ray` starts is recorded here (:func:`track_session`) so that
its processes can be found, by process tree and by open files, and killed if shutting down hangs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from nanochat.common import NanochatError, get_logger

log = get_logger(__name__)

# How long Ctrl-C / SIGTERM may take to stop a command and the Ray it started (docs/troubleshooting.md).
STOP_TIMEOUT_S = 15.0
# How long a Train run waits for an earlier run of the same name (a stopped job's, winding down) to end.
EARLIER_RUN_WAIT_S = 60.0
_KILL_GRACE_S = 1.0  # SIGTERM, then SIGKILL after this long

_session_dir: str | None = None  # the embedded Ray this process started (None: none, or a joined cluster)
_stop_hooks: list[Callable[[], None]] = []  # graceful steps before ray.shutdown, in order


def track_session(session_dir: str | None) -> None:
    """Record the session dir of the embedded Ray this process just started (None: a joined cluster)."""
    global _session_dir
    _session_dir = session_dir


def on_stop(hook: Callable[[], None]) -> None:
    """Run ``hook`` (e.g. drain a Serve app) before Ray is shut down when the command ends (in order)."""
    _stop_hooks.append(hook)


def raise_interrupt(signum: int, frame: Any) -> None:
    """The SIGTERM handler of a stopping command: do what Ctrl-C does, then unwind.

    A graceful Ctrl-C handler that a library installed runs first: Ray Train's aborts the run (its
    workers end now, the run is marked ABORTED) instead of leaving the controller and workers to
    die with this driver seconds later, while a job resubmitted at once may already train the run.
    """
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler not in (signal.default_int_handler, raise_interrupt, _ignore):
        with contextlib.suppress(SystemExit):  # Train's exits once the run is aborted: still an interrupt
            handler(signal.SIGINT, frame)
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
    previous = (signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, raise_interrupt)) if in_main else None
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


# ---- a stopped job's Train run, still winding down ------------------------------------------------


def wait_for_earlier_run(name: str, timeout_s: float = EARLIER_RUN_WAIT_S, poll_s: float = 0.5) -> bool:
    """Wait until no earlier Ray Train run named ``name`` has a live controller or worker (bounded).

    After ``ray job stop`` (SIGTERM, then SIGKILL 3 s later) the job counts as STOPPED while its
    Train controller and workers still run for seconds; a job resubmitted at once would train the
    same run (same storage) alongside them. Runs are found through Train's state actor (with the
    dashboard or on a cluster); without one, nothing is waited for. Returns True when none is
    alive, False when ``timeout_s`` passed (logged; training then starts anyway).
    """
    live = _live_train_actors(name)
    if not live:
        return True
    log.warning("an earlier Train run '%s' is still running (%d live actors: a stopped job winding down?); "
                "waiting up to %.0f s for it to end", name, len(live), timeout_s)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(poll_s)
        if not _live_train_actors(name):
            log.warning("the earlier Train run '%s' ended after %.1f s; starting", name, time.monotonic() - t0)
            return True
    log.warning("the earlier Train run '%s' is still running after %.0f s; starting anyway", name, timeout_s)
    return False


def _live_train_actors(name: str) -> list[str]:
    """Actor IDs of the controllers, and of their latest attempt's workers, of Train runs named ``name``
    that the GCS does not yet list as DEAD ([] when Train's state actor is absent or cannot answer)."""
    import ray

    try:
        from ray.train.v2._internal.state.state_actor import get_state_actor

        actor = get_state_actor()
        if actor is None:
            return []
        runs = ray.get(actor.get_train_runs.remote(), timeout=10)
        attempts = ray.get(actor.get_train_run_attempts.remote(), timeout=10)
    except Exception as err:  # noqa: BLE001 - an internal API of Ray 2.60: never block training on it
        log.debug("cannot list Train runs: %s", err)
        return []
    ids = []
    for run in runs.values():
        if run.name == name:
            latest = list(attempts.get(run.id, {}).values())[-1:]
            ids += [run.controller_actor_id, *(w.actor_id for a in latest for w in a.workers)]
    return [i for i in ids if _actor_alive(i)]


def _actor_alive(actor_id: str) -> bool:
    from ray._private.state import actors

    try:
        return actors(actor_id=actor_id).get("State", "DEAD") != "DEAD"
    except Exception:  # noqa: BLE001 - unknown to the GCS: gone
        return False
