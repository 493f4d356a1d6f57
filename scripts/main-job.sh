#!/usr/bin/env bash
# The offline main job: set up, build the SmolLM2 example model if missing, then
# a round-to-nearest baseline, then quantize -> eval (with gates) -> dry-run push, which prints the model card it
# would publish; then GPTQ and the baseline side by side, scored on the same windows.
# Extra arguments go to `lowbit run` (e.g. --json, --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ ! -f out/smollm2-135m/config.json ]; then
  python -m lowbit.examples smollm2 out/smollm2-135m >&2   # stdout stays the run's (e.g. with --json)
fi
# the baseline: round-to-nearest with the same group size, scored on the same windows (no gates, no push)
lowbit run examples/smollm2-rtn.toml >&2
status=0
lowbit run examples/smollm2.toml --dry-run-push "$@" || status=$?   # its gates: examples/smollm2.toml [eval.gates]
# GPTQ against RTN, in figures (to stderr with --json, so that stdout stays the run's JSON)
case " $* " in *" --json "*) out=2 ;; *) out=1 ;; esac
python -m lowbit.examples compare out/smollm2-135m-gptq-4bit out/smollm2-135m-rtn-4bit >&"$out" || true
exit "$status"
