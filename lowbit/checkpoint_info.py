"""What a checkpoint folder holds, and whether it is what its manifest and config say.

`summarize(folder)` reads `lowbit_manifest.json` (when there is one) and
`config.json`: method, bits, group size, size, source, evaluation.
`verify(folder)` lists every mismatch, one line each:
- a file whose size or sha256 differs from the manifest's "files", or that is missing;
- a tensor that is missing, unexpected, or has another shape or dtype than the
  config implies. The expected tensors come from the model skeleton on `meta`
  (no memory), with each quantized Linear [N, K] replaced by its stored form:
  GPTQ v1 qweight/qzeros/scales/g_idx, or bitsandbytes' packed uint8 and quant state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError, UsageError
from lowbit.files import sha256_file
from lowbit.quantize.checkpoint import SafetensorsCheckpoint, check_remote_code, load_config_dict
from lowbit.manifest import MANIFEST, read_manifest
from lowbit.quantize.nf4 import VLLM_REFUSAL as VLLM_BNB_REFUSAL
from lowbit.quantize.nf4 import expected_tensors as bnb_expected
from lowbit.quantize.pack import LinearFormat, config_codes, dynamic_format, vllm_refusal
from lowbit.quantize.pack import expected_tensors as gptq_expected

# name -> (dtype, shape); shape None: any 1-D length (bitsandbytes' serialized quant state)
Expected = dict[str, tuple[torch.dtype | None, tuple[int, ...] | None]]


@dataclass
class CheckpointSummary:
    folder: str
    method: str  # gptq, rtn, nf4, fp4, or dense
    architecture: str | None
    bits: int | None
    group_size: int | None  # GPTQ groups; None for bitsandbytes (blocks of 64) and dense
    bits_per_weight: float | None  # of the quantized Linears, from the manifest
    size_bytes: int  # the files in the folder
    source: dict | None
    calibration: dict | None
    eval: dict | None
    created: str | None
    # a GPTQ checkpoint with a `dynamic` map (lowbit quantize --target-bpw): layer -> module -> its format tag
    formats: dict[str, dict[str, str]] | None = None
    # why vLLM would refuse the checkpoint (GPTQ: pack.vllm_refusal; bitsandbytes: nf4.VLLM_REFUSAL); None otherwise
    vllm_refusal: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def manifest_if_any(folder: Path) -> dict | None:
    """The manifest, or None for a checkpoint that lowbit did not write."""
    return read_manifest(folder) if (Path(folder) / MANIFEST).exists() else None


def summarize(folder: Path) -> CheckpointSummary:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"not a checkpoint folder: {folder}")
    config = load_config_dict(folder)
    manifest = manifest_if_any(folder) or {}
    quant = config.get("quantization_config") or {}
    method = manifest.get("method") or _method_of(quant)
    settings = manifest.get("settings") or {}
    if quant.get("quant_method") == "gptq":
        bits, group_size = settings.get("bits", quant.get("bits")), settings.get("group_size", quant.get("group_size"))
    else:
        bits, group_size = (4 if method in ("nf4", "fp4") else None), None
    return CheckpointSummary(
        folder=str(folder),
        method=method,
        architecture=(config.get("architectures") or [None])[0],
        bits=bits,
        group_size=group_size,
        bits_per_weight=manifest.get("bits_per_weight"),
        size_bytes=sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
        source=manifest.get("source"),
        calibration=manifest.get("calibration"),
        eval=manifest.get("eval"),
        created=manifest.get("created"),
        formats=layer_formats(config, quant) if quant.get("dynamic") or _skips_decoder_linears(quant) else None,
        vllm_refusal=vllm_refusal(config_codes(quant)) if quant.get("quant_method") == "gptq"
        else VLLM_BNB_REFUSAL if quant.get("quant_method") == "bitsandbytes" else None,
    )


def layer_formats(config: dict, quant: dict) -> dict[str, dict[str, str]]:
    """Each decoder layer's Linears and their format: what the dynamic map gives them ("4g128", "8g128",
    "16"), or for bitsandbytes "nf4"/"fp4" and "16" for those in llm_int8_skip_modules."""
    from lowbit.quantize.arch import architecture_of

    arch = architecture_of(config)
    if quant.get("quant_method") == "bitsandbytes":
        skip = set(quant.get("llm_int8_skip_modules") or [])
        kind = quant.get("bnb_4bit_quant_type") or "nf4"
        tags = {m: "16" if {m, arch.loaded_name(m)} & skip else kind for m in arch.quantized_linears()}
    else:
        tags = {m: fmt.tag for m, fmt in gptq_formats(arch, quant).items()}
    return {str(i): {name: tags[arch.layer_prefix(i) + name] for name in arch.linear_names()}
            for i in range(arch.num_layers)}


def _skips_decoder_linears(quant: dict) -> bool:
    return any(".layers." in name for name in quant.get("llm_int8_skip_modules") or [])


def gptq_formats(arch, quant: dict) -> dict[str, LinearFormat]:
    """Every decoder Linear's GPTQ format: the config's bits and group size, or its dynamic override."""
    base = LinearFormat(quant.get("bits", 4), quant.get("group_size", 128))
    return {m: dynamic_format(quant.get("dynamic"), [m, arch.loaded_name(m)], base) for m in arch.quantized_linears()}


def _method_of(quant: dict) -> str:
    if quant.get("quant_method") == "gptq":
        return (quant.get("meta") or {}).get("method") or "gptq"
    if quant.get("quant_method") == "bitsandbytes":
        return quant.get("bnb_4bit_quant_type") or "nf4"
    return quant.get("quant_method") or "dense"


def verify(folder: Path) -> list[str]:
    """Every mismatch between the folder and its manifest and config; [] when there is none."""
    folder = Path(folder)
    try:
        manifest = manifest_if_any(folder)
    except LowbitError as e:
        return [str(e)]
    if manifest is None:
        problems = [f"no {MANIFEST} in {folder}: nothing to check the files against"]
    else:
        problems = file_problems(folder, manifest.get("files"))
    try:
        problems += tensor_problems(folder)
    except LowbitError as e:  # e.g. a shard too corrupt to read its header
        problems.append(str(e))
    return problems


def file_problems(folder: Path, files) -> list[str]:
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return [f'{MANIFEST} has no "files" table']
    problems = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or name in (".", ".."):
            problems.append(f"the manifest names a file outside the folder: {name}")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry.get('size')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest")
    problems += [f"{f.name}: not in the manifest" for f in sorted(folder.glob("*.safetensors")) if f.name not in files]
    return problems


def tensor_problems(folder: Path) -> list[str]:
    from lowbit.quantize.arch import architecture_of

    config = load_config_dict(folder)
    expected, optional = expected_tensors(folder, config)
    actual = SafetensorsCheckpoint(folder).tensors
    problems = []
    for name, (dtype, shape) in expected.items():
        if name not in actual:
            if name not in optional:
                problems.append(f"{name}: missing")
            continue
        info = actual[name]
        shape_ok = len(info.shape) == 1 if shape is None else info.shape == shape
        if not shape_ok or (dtype is not None and info.dtype != dtype):
            found, implied = _describe(info.dtype, info.shape), _describe(dtype, shape)
            problems.append(f"{name}: {found}, the config implies {implied}")
    kept = architecture_of(config).unquantized_modules  # a vision tower: copied as it is, checked by its file hashes
    problems += [f"{name}: not a tensor this config has" for name in actual
                 if name not in expected and not any(name.startswith(m + ".") or name.startswith(f"model.{m}.")
                                                     for m in kept)]
    return problems


def _describe(dtype: torch.dtype | None, shape: tuple[int, ...] | None) -> str:
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "any dtype"
    return f"{dtype_name} {list(shape) if shape is not None else '[any]'}"


def expected_tensors(folder: Path, config: dict) -> tuple[Expected, set[str]]:
    """Every tensor the config implies, and the names that may be absent (a tied lm_head)."""
    from lowbit.quantize.arch import architecture_of
    from lowbit.quantize.stream import build_skeleton, load_config

    check_remote_code(config, str(folder), trust_remote_code=False)
    arch = architecture_of(config, SafetensorsCheckpoint(folder).names())
    skeleton = build_skeleton(load_config(folder))  # the language model, every parameter on meta: shapes, no memory
    dtype_name = config.get("torch_dtype") or config.get("dtype")
    dense_dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    dense_dtype = dense_dtype if isinstance(dense_dtype, torch.dtype) else None  # unknown: any dtype
    quant = config.get("quantization_config") or {}
    quantized = quantized_modules(arch, quant)
    formats = gptq_formats(arch, quant) if quant.get("quant_method") == "gptq" else None

    expected: Expected = {}
    for name, param in skeleton.named_parameters():
        if name.startswith("model."):  # the checkpoint's spelling (a multimodal model's language model)
            name = arch.text_prefix + name[len("model."):]
        module, _, kind = name.rpartition(".")
        if module not in quantized:
            expected[name] = (dense_dtype, tuple(param.shape))
        elif kind == "weight":
            n, k = param.shape
            stored = gptq_tensors(n, k, formats[module]) if formats else bnb_tensors(n, k, quant)
            expected.update({f"{module}.{key}": value for key, value in stored.items()})
        else:  # a quantized Linear's bias: float16 in GPTQ, the model's dtype in bitsandbytes
            bias_dtype = torch.float16 if quant.get("quant_method") == "gptq" else dense_dtype
            expected[name] = (bias_dtype, tuple(param.shape))
    optional = set()
    embed = skeleton.get_input_embeddings().weight
    if skeleton.get_output_embeddings() is not None and skeleton.get_output_embeddings().weight is embed:
        expected["lm_head.weight"] = (dense_dtype, tuple(embed.shape))  # tied: saved or not
        optional.add("lm_head.weight")
    return expected, optional


def quantized_modules(arch, quant: dict) -> set[str]:
    """Full names of the Linears stored quantized: every decoder-layer projection, less bitsandbytes' skips."""
    method = quant.get("quant_method")
    if method is None:
        return set()
    if method not in ("gptq", "bitsandbytes"):
        raise UsageError(f"cannot verify a {method} checkpoint (lowbit writes gptq and bitsandbytes)")
    if method == "gptq":  # all of them, less those a dynamic map leaves unquantized
        return {m for m, fmt in gptq_formats(arch, quant).items() if fmt.quantized}
    skip = quant.get("llm_int8_skip_modules") or []
    return set(arch.quantized_linears(lambda n: any(m == s or m.startswith(s + ".")
                                                    for s in skip for m in (n, arch.loaded_name(n)))))


def gptq_tensors(n: int, k: int, fmt: LinearFormat) -> Expected:
    """GPTQ v1 tensors of a Linear [N, K] in its format (from the checkpoint's quantization_config)."""
    return gptq_expected(n, k, fmt.bits, fmt.group_size)


def bnb_tensors(n: int, k: int, quant: dict) -> Expected:
    """bitsandbytes 4-bit tensors of a Linear [N, K], from the checkpoint's quantization_config."""
    return bnb_expected(n, k, quant.get("bnb_4bit_quant_type", "nf4"), bool(quant.get("bnb_4bit_use_double_quant")))
