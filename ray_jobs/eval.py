"""Ray job entrypoint for ``nanochat eval`` (same flags, same ``--help``).

    ray job submit --working-dir . -- python ray_jobs/eval.py base --checkpoint base --num-actors 8
    ray job submit --working-dir . -- python ray_jobs/eval.py chat --tasks ARC-Easy,GSM8K --num-actors 8

On a GPU cluster each actor takes one GPU (one model replica per GPU); locally, CPU actors.
Inside a job (RAY_ADDRESS set) it joins the cluster; run directly, it starts a local Ray.
"""

import sys
from pathlib import Path

# The repo root (the job's working_dir) holds the package when it is not pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("eval")
