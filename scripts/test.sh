#!/usr/bin/env bash
# Set up and run the test suite (CPU only, about 12 minutes on 2 cores).
# The loader check (gptqmodel in a venv of its own, built once: minutes) is opt-in: bash scripts/test.sh -m loaders
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider -m "not loaders" "$@"
