"""``python -m nanochat.report [OUT_DIR]``: write the report, print its path."""

import sys

from nanochat.report import build_report

print(build_report(sys.argv[1] if len(sys.argv) > 1 else None))
