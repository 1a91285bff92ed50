#!/usr/bin/env bash
# Set up, index sample_corpus/ with the bundled model, and run a query.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
dsearch index sample_corpus/passages.jsonl -o sample.idx
dsearch query sample.idx "what causes the northern lights" -k 3
