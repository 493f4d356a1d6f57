#!/usr/bin/env bash
# Set up and run the test suite (CPU only, about 6 minutes on 2 cores with the set-up).
# Opt-in: the loader check (gptqmodel in a venv of its own, built once: minutes), bash scripts/test.sh -m loaders;
# the tests marked long (SmolLM2 end to end), bash scripts/test.sh -m long
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider -m "not loaders and not long" "$@"
