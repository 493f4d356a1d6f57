#!/usr/bin/env bash
# The offline main job: set up, build the SmolLM2 example model if missing, then
# quantize -> eval (with gates) -> dry-run push, which prints the model card it would publish.
# Extra arguments go to `lowbit run` (e.g. --json, --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ ! -f out/smollm2-135m/config.json ]; then
  python -m lowbit.examples smollm2 out/smollm2-135m >&2   # stdout stays the run's (e.g. with --json)
fi
lowbit run examples/smollm2.toml --dry-run-push "$@"
