"""Ray job entrypoint: `ray job submit --working-dir . -- python ray_jobs/sft.py --preset tiny`.

Takes the same flags as `nanochat train sft`. Inside a job (RAY_ADDRESS set) it joins the
cluster; run directly, it starts a local Ray.
"""

import sys
from pathlib import Path

# The repo root (the job's working_dir) holds the package when it is not pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.train.cli_args import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("sft"))
