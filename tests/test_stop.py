"""Ctrl-C and SIGTERM stop every command that starts Ray, within the bound, leaving nothing running.

Fast tests drive :func:`nanochat.ray_stop.stop_on_signals` (the one helper that `serve`, `run`,
`train`, `eval` and `tune` run under) in small subprocesses; slow ones stop a real `nanochat serve`
(with a stream in flight) and a real `nanochat train` and take a census of their processes. A
process belongs to a run if it is in the run's process group, descends from it, or holds a file
open under the run's own Ray temp dir ($RAY_TMPDIR) — never by name: other Ray clusters run here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from nanochat.ray_stop import STOP_TIMEOUT_S, stop_on_signals

sys.path.insert(0, str(Path(__file__).parent))
from _helpers_serve import build_tiny_checkpoint, free_port, wait_healthy  # noqa: E402
from _helpers_train import tiny_overrides  # noqa: E402

BIN = Path(sys.executable).parent
SLACK_S = 5.0  # scheduling noise on a loaded 2-core CI machine, on top of the stated bound


# ---- census ------------------------------------------------------------------------------------


def census(pid: int, ray_tmp: str) -> dict[int, psutil.Process]:
    """Processes of one run: its process group (start_new_session), its descendants, and any process
    with a file open under its Ray temp dir (Ray workers live in their own process groups)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pid or any(f.path.startswith(ray_tmp) for f in proc.open_files()):
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            pass
    try:
        found.update({c.pid: c for c in psutil.Process(pid).children(recursive=True)})
    except psutil.Error:
        pass
    return found


def alive(procs) -> list[str]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid} {proc.name()}")
        except psutil.Error:
            pass
    return out


def wait_exit(proc: subprocess.Popen, bound: float) -> float:
    start = time.monotonic()
    try:
        proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        output = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"still running {bound:.0f} s after the signal\n{output[-3000:]}")
    return time.monotonic() - start


# ---- the helper, fast --------------------------------------------------------------------------


def test_sigterm_raises_keyboard_interrupt_and_the_previous_handler_comes_back():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals():
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"  # Tune would wind down slowly instead
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("SIGTERM did not interrupt")
    assert signal.getsignal(signal.SIGTERM) is previous
    assert signal.set_wakeup_fd(-1) == -1  # the watcher's wakeup fd was handed back


@pytest.mark.parametrize("argv, uses_ray", [
    (["serve"], True), (["run"], True), (["train", "pretrain"], True), (["train", "sft"], True),
    (["eval", "base"], True), (["eval", "chat"], True), (["tune"], True),
    (["chat"], False), (["eval", "bpb"], False), (["checkpoint", "list"], False),
])
def test_every_command_that_starts_ray_runs_under_the_stop_helper(argv, uses_ray):
    from nanochat.cli import build_parser

    assert getattr(build_parser().parse_args(argv), "uses_ray", False) is uses_ray


# A command under stop_on_signals whose Ray drain hangs. Its "Ray session" holds two processes that
# ignore SIGTERM: a child, and a re-parented orphan found only by the file it holds in the session dir.
CHILD = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from nanochat import ray_stop

    session, timeout_s = sys.argv[1], float(sys.argv[2])
    hold = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); f = open(sys.argv[1], 'w'); time.sleep(600)"
    ray_stop._ray_running = lambda: os.path.exists(os.path.join(session, "started"))
    with ray_stop.stop_on_signals(timeout_s):
        ray_stop.track_session(session)
        open(os.path.join(session, "started"), "w").close()
        subprocess.Popen([sys.executable, "-c", hold, os.path.join(session, "child.log")])
        orphan = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {hold!r}, {session!r} + '/orphan.log'], start_new_session=True)"
        subprocess.run([sys.executable, "-c", orphan], check=True)
        ray_stop.on_stop(lambda: time.sleep(600))  # a drain that never returns
        while not (os.path.exists(os.path.join(session, "child.log")) and os.path.exists(os.path.join(session, "orphan.log"))):
            time.sleep(0.05)
        print("ready", flush=True)
        time.sleep(600)
    """
)


def _holders(path: str) -> list[psutil.Process]:
    return [p for p in map(_proc, psutil.pids()) if p is not None and _holds(p, path)]


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _holds(proc: psutil.Process, path: str) -> bool:
    try:
        return any(f.path.startswith(path) for f in proc.open_files())
    except (psutil.Error, OSError):
        return False


@pytest.mark.parametrize("signals, timeout_s", [(1, 4.0), (2, 60.0)], ids=["deadline", "second-signal"])
def test_a_hung_shutdown_is_cut_and_only_that_sessions_processes_are_killed(tmp_path, signals, timeout_s):
    session = tmp_path / "session"
    session.mkdir()
    decoy_dir = tmp_path / "other_session"
    decoy_dir.mkdir()
    # Same program and name as the session's processes, but another session: it must survive.
    decoy = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'w'); time.sleep(600)",
                              str(decoy_dir / "w.log")])
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(session), str(timeout_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        ours = _holders(str(session))
        assert len(ours) == 2  # the child and the orphan
        for _ in range(signals):
            os.kill(proc.pid, signal.SIGINT)
            time.sleep(0.5)
        wait_exit(proc, (timeout_s if signals == 1 else 5.0) + SLACK_S)
        err = proc.stderr.read()
        assert proc.returncode == 130, err
        assert ("did not finish in time" if signals == 1 else "interrupted again") in err
        assert not alive(ours) and not _holders(str(session))
        assert decoy.poll() is None  # another session's process of the same name lives on
    finally:
        decoy.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _holders(str(session)):
            p.kill()


# ---- real commands, slow -----------------------------------------------------------------------


def _ray_tmp() -> str:
    # Short: Ray's socket paths under it must stay below the 107-byte AF_UNIX limit.
    return tempfile.mkdtemp(prefix="nc-stop-", dir="/tmp")


def _start(args: list[str], base: Path, ray_tmp: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([str(BIN / "nanochat"), *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stream(url: str, outcome: dict) -> None:
    """One streaming chat completion; records how it ended."""
    # 4 samples of up to 480 tokens: hundreds of decode steps (seconds on 2 cores), well inside the drain
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "n": 4, "stream": True,
            "temperature": 1.0, "seed": 1}
    lines: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 1:
                        outcome["first"].set()
        outcome["end"] = "done" if lines and lines[-1] == "data: [DONE]" else f"closed after {len(lines)} lines"
    except httpx.HTTPError as err:
        outcome["end"] = f"error: {err!r}"
    finally:
        outcome["first"].set()


@pytest.fixture(scope="module")
def serve_base(tmp_path_factory, tiny_tokenizer, tiny_model_factory) -> Path:
    base = tmp_path_factory.mktemp("stop_serve")
    build_tiny_checkpoint(base, tiny_tokenizer, tiny_model_factory, tag="stop")
    return base


@contextlib.contextmanager
def _command(args: list[str], base: Path, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real ``nanochat`` command in its own process group and Ray temp dir; killed and cleaned up after."""
    ray_tmp = _ray_tmp()
    proc = _start(args, base, ray_tmp, log)
    try:
        yield proc, ray_tmp
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(log.read_text()[-6000:])
        time.sleep(0.5)


def _signal_and_wait(proc: subprocess.Popen, sig: int, to_group: bool) -> float:
    """Send ``sig`` (to the process group or the pid); seconds until the command exited (bounded)."""
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    took = wait_exit(proc, STOP_TIMEOUT_S + SLACK_S)
    print(f"stopped {took:.1f} s after the signal")
    return took


def _assert_nothing_left(proc: subprocess.Popen, before: dict, ray_tmp: str, took: float) -> None:
    time.sleep(1)
    left = alive(before.values()) + alive(census(proc.pid, ray_tmp).values())
    assert not left, f"left running {took:.1f} s after the signal: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("sig, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-group", "kill-pid"])
def test_nanochat_serve_stops_within_the_bound_ending_streams_and_leaving_nothing(serve_base, tmp_path, sig, to_group):
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("starts its own local Ray; unset RAY_ADDRESS")
    port, log = free_port(), tmp_path / "serve.log"
    with _command(["serve", "--port", str(port), "--set", "compile=false"], serve_base, log) as (proc, ray_tmp):
        _wait_for_line(proc, log, "press Ctrl-C to stop", 240)  # what the user sees once it is up
        wait_healthy(f"http://127.0.0.1:{port}/health", timeout=30)
        before = census(proc.pid, ray_tmp)
        assert len(before) > 5  # the CLI, GCS, raylet, agents, Serve's controller/proxy/replica
        outcome: dict = {"first": threading.Event()}
        client = threading.Thread(target=_stream, args=(f"http://127.0.0.1:{port}", outcome))
        client.start()
        assert outcome["first"].wait(60), "the stream never started"
        assert "end" not in outcome, "the stream ended before the signal: make it longer"
        took = _signal_and_wait(proc, sig, to_group)
        client.join(30)
        text = log.read_text()
        assert proc.returncode == 130, text[-3000:]
        assert "shutting down" in text and "interrupted" in text
        assert outcome.get("end") == "done", outcome  # the in-flight stream finished: [DONE]
        _assert_nothing_left(proc, before, ray_tmp, took)


@pytest.mark.slow
def test_nanochat_train_stops_on_ctrl_c_within_the_bound_leaving_nothing(prepared_tiny_data, tmp_path):
    """Ray Train installs its own SIGINT handler (abort, then sys.exit): still an interrupt, still bounded."""
    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("starts its own local Ray; unset RAY_ADDRESS")
    log = tmp_path / "train.log"
    overrides = [a for o in tiny_overrides(steps=100_000) for a in ("--set", o)]
    args = ["train", "pretrain", "--preset", "tiny", "--tag", "stop", "--restart", *overrides]
    with _command(args, prepared_tiny_data, log) as (proc, ray_tmp):
        _wait_for_line(proc, log, "base step 0/", 300)  # the first report: the workers are training
        before = census(proc.pid, ray_tmp)
        took = _signal_and_wait(proc, signal.SIGINT, to_group=True)
        text = log.read_text()
        assert proc.returncode == 130 and "interrupted" in text, text[-3000:]
        _assert_nothing_left(proc, before, ray_tmp, took)
