"""Ray job entrypoint for evaluations (same options as ``nanochat eval``).

    ray job submit --working-dir . -- python ray_jobs/eval.py base --checkpoint base --num-actors 8
    ray job submit --working-dir . -- python ray_jobs/eval.py chat --tasks ARC-Easy,GSM8K --num-actors 8

On a GPU cluster each actor takes one GPU (one model replica per GPU); locally, CPU actors.
"""

import sys

from nanochat.cli import main as cli_main

if __name__ == "__main__":
    sys.exit(cli_main(["eval", *sys.argv[1:]]))
