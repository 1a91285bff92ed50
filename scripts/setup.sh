#!/usr/bin/env bash
# Create .venv (if missing) and install dsearch into it: torch's CPU build first, then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
# Pinned on purpose: an unpinned torch pulls a CUDA build of several GB.
pip install --quiet --disable-pip-version-check torch==2.13.0
pip install --quiet --disable-pip-version-check -e ".${extras}"
