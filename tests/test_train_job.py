"""`ray job submit` of the pretrain entrypoint against a separately started `ray start --head` cluster."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _helpers_train import TEXT, tiny_overrides
from _ray_head import job_env, ray_head, submit_job

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
    env = job_env(base_dir)
    with ray_head(env, tmp_path / "head.log") as address:
        sets = [a for o in tiny_overrides(steps=4) for a in ("--set", o)]
        job = submit_job(address, env, ["python", "ray_jobs/pretrain.py", "--preset", "tiny", "--tag", "job", *sets])
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "pretrain done: 4 steps" in job.stdout
        assert (base_dir / "checkpoints/base/job/step_000004/model.safetensors").exists()
