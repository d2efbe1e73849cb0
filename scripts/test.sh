#!/usr/bin/env bash
# The test command (README, .ci/run, GitHub Actions): set up, then run every test (fast and slow) with a
# coverage report of the public API. Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
.venv/bin/python -m ruff check .
# The two-node cluster tests (tests/test_multinode.py, ~10 min here) are left out by default to keep the
# run under an hour on 2 cores; `scripts/test.sh -m multinode` runs them (a later -m replaces this one).
exec .venv/bin/python -m pytest --cov=nanochat --cov-report=term:skip-covered --durations=25 -m "not multinode" "$@" tests
