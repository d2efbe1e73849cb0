"""Ray job entrypoint for a hyperparameter sweep (same options as ``nanochat tune``).

    ray job submit --working-dir . -- python ray_jobs/tune.py --preset d12 --num-samples 8
"""

import argparse
import sys

from nanochat.cli import main as cli_main
from nanochat.commands.tune import add_tune_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_args(parser)
    parser.parse_args()
    sys.exit(cli_main(["tune", *sys.argv[1:]]))
