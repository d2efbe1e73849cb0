"""Ray job entrypoint for the whole pipeline (same options as ``nanochat run``).

    ray job submit --working-dir . -- python ray_jobs/pipeline.py --preset d20
"""

import argparse
import sys

from nanochat.cli import main as cli_main
from nanochat.commands.run import add_run_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    parser.parse_args()  # validate here so --help and errors come from this script
    sys.exit(cli_main(["run", *sys.argv[1:]]))
