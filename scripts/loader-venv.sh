#!/usr/bin/env bash
# Build a separate virtual environment with the loaders users run on lowbit's output:
# transformers + gptqmodel 7.6.0 (+ optimum, which transformers asks for GPTQ) (the last release that runs on torch 2.13, the CPU build on disk).
# Usage: scripts/loader-venv.sh VENV_DIR. Idempotent: a finished venv has VENV_DIR/.complete.
# gptqmodel's dependency pypcre compiles against libpcre2-dev (scripts/setup.sh installs it).
set -euo pipefail
venv="$1"
if [ -f "$venv/.complete" ]; then exit 0; fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and exact: a range would let pip pull a newer CUDA build (GBs)
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q "torch==2.13.0" "gptqmodel==7.6.0" "transformers==5.24.0" "optimum==2.3.0" "safetensors"
touch "$venv/.complete"
