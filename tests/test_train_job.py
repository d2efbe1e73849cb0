"""`ray job submit` of the pretrain entrypoint against a separately started `ray start --head` cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _helpers_train import TEXT, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_shards(directory: Path) -> None:
    """Two real parquet shards in nanochat's layout (one `text` column); the last is val."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [TEXT[i % 50:] * 3 for i in range(200)]
    for i, part in enumerate((docs[:160], docs[160:])):
        pq.write_table(pa.table({"text": part}), directory / f"shard_{i:05d}.parquet", compression="zstd")


@pytest.mark.slow
def test_ray_job_submit_runs_the_tiny_pretrain(base_dir, tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(base_dir / "tokenizer")
    _write_shards(base_dir / "data" / "builtin")
    port, dash = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "NANOCHAT_BASE_DIR": str(base_dir),
        "RAY_AUTH_MODE": "token",  # 2.60 enables token auth; the CLIs need the mode to find the token
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    }
    env.pop("RAY_ADDRESS", None)
    # Our own temp dir: `ray start` records its address there, so later ray.init() calls elsewhere on
    # this machine do not find (and try to join) this short-lived cluster.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        sets = [a for o in tiny_overrides(steps=4) for a in ("--set", o)]
        for _ in range(30):  # the job agent comes up a little after the dashboard answers
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                 "python", "ray_jobs/pretrain.py", "--preset", "tiny", "--tag", "job", *sets],
                env=env, capture_output=True, text=True, timeout=900,
            )
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "pretrain done: 4 steps" in job.stdout
        assert (base_dir / "checkpoints/base/job/step_000004/model.safetensors").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
