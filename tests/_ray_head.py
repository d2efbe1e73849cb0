"""A separately started `ray start --head` cluster for `ray job submit` tests, stopped exactly (not `ray stop`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(base_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "NANOCHAT_BASE_DIR": str(base_dir),
        "RAY_AUTH_MODE": "token",  # 2.60 enables token auth; the CLIs need the mode to find the token
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    }
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def ray_head(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Start a head node (--block keeps it in our process group); yield its job-submission address."""
    # A short temp dir of our own: unix socket paths have a length limit, and `ray start` records its
    # address there, so ray.init() calls elsewhere on this machine do not try to join this cluster.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Every per-node agent port is chosen free too: the test session's embedded Ray already holds the
    # defaults (the dashboard agent's 52365), and a head whose agent cannot bind never accepts a job
    # ("No available agent to submit job").
    agent_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", f"--dashboard-port={dash}", *agent_ports, "--disable-usage-stats"],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert head.poll() is None, f"ray start --head exited: {log_path.read_text()[-2000:]}"
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(address: str, env: dict[str, str], entrypoint: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir REPO -- ENTRYPOINT`, retried while the job agent is still starting.

    On a loaded 2-core machine the head's job agent can register a while after the dashboard answers."""
    deadline = time.time() + 180
    while True:
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            return job
        time.sleep(5)
