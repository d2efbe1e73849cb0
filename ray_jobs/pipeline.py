"""Ray job entrypoint for ``nanochat run`` (same flags, same ``--help``).

    ray job submit --working-dir . -- python ray_jobs/pipeline.py --preset d20

Inside a job (RAY_ADDRESS set) it joins the cluster; run directly, it starts a local Ray.
"""

import sys
from pathlib import Path

# The repo root (the job's working_dir) holds the package when it is not pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("run")
