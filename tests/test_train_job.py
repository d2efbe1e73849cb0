"""`ray job submit` of the pretrain entrypoint against a separately started `ray start --head` cluster."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from _helpers_train import tiny_overrides, write_text_shards
from _ray_head import job_env, ray_head, submit_job

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_tiny_pretrain(base_dir, tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(base_dir / "tokenizer")
    write_text_shards(base_dir / "data" / "builtin")
    env = job_env(base_dir)
    with ray_head(env, tmp_path / "head.log") as address:
        sets = [a for o in tiny_overrides(steps=4) for a in ("--set", o)]
        job = submit_job(address, env, ["python", "ray_jobs/pretrain.py", "--preset", "tiny", "--tag", "job", *sets])
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "pretrain done: 4 steps" in job.stdout
        assert (base_dir / "checkpoints/base/job/step_000004/model.safetensors").exists()
        # The head's dashboard shows the job and, through Train's state actor, its training run.
        import httpx
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        headers = get_auth_headers_if_auth_enabled({})
        jobs = httpx.get(f"{address}/api/jobs/", headers=headers, timeout=30).json()
        assert any(j["entrypoint"].startswith("python ray_jobs/pretrain.py") for j in jobs), jobs
        runs = httpx.get(f"{address}/api/train/v2/runs/v1", headers=headers, timeout=30).json()["train_runs"]
        assert [r["status"] for r in runs if r["name"] == "base-job"] == ["FINISHED"], runs
