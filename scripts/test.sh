#!/usr/bin/env bash
# Set up with the test and ray extras (so CI runs the Ray tests), lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[test,ray]"
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest "$@"
