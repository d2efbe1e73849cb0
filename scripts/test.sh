#!/usr/bin/env bash
# The test command (README, .ci/run, GitHub Actions): set up, then run every test (fast and slow) with a
# coverage report of the public API. Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest --cov=nanochat --cov-report=term:skip-covered --durations=25 "$@" tests
