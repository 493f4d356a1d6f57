"""GPTQ "v1" on-disk layout, as AutoGPTQ writes it and transformers, vLLM and exllama read it.

Codes are packed as a little-endian bit stream along a dimension into 32-bit words:
value j occupies bits j*b .. j*b+b-1 of the stream, word r holding stream bits
32r .. 32r+31. For b = 2, 4, 8 a word holds whole values; for b = 3 values 10 and 21
of every 32 straddle two words (AutoGPTQ's 10/1/10/1/10 split is this same stream).
Zero points are stored minus one (the v1 quirk).

This module is the format's one description: the tensors of a quantized Linear, their shapes and
bytes on disk, and the `quantization_config` a loader reads. The writer, loader, inspector and
plan ask it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit import __version__
from lowbit.errors import CorruptInputError
from lowbit.quantize.arch import Architecture
from lowbit.quantize.gptq import QuantizedWeight
from lowbit.quantize.settings import QuantizeSettings

LOW_32_BITS = 0xFFFFFFFF
CHUNK_VALUES = 2**22  # codes packed at once: bounds the int64 temporaries to ~100 MB whatever the matrix
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # of each quantized Linear; its bias is float16


def expected_tensors(n: int, k: int, bits: int, group_size: int | None) -> dict[str, tuple[torch.dtype, tuple]]:
    """(dtype, shape) of a Linear [N, K]: qweight [K*b/32, N], qzeros [groups, N*b/32], scales, g_idx [K]."""
    groups = 1 if group_size in (-1, None) else math.ceil(k / group_size)
    return {
        "qweight": (torch.int32, (k * bits // 32, n)),
        "qzeros": (torch.int32, (groups, n * bits // 32)),
        "scales": (torch.float16, (groups, n)),
        "g_idx": (torch.int32, (k,)),
    }


def linear_bytes(n: int, k: int, bits: int, group_size: int) -> int:
    """Bytes on disk of one Linear [N, K] (without bias); group_size divides K, or is -1."""
    groups = 1 if group_size == -1 else k // group_size
    return n * k * bits // 8 + groups * n * bits // 8 + groups * n * 2 + k * 4  # qweight qzeros scales g_idx


@dataclass(frozen=True)
class LinearFormat:
    """How one Linear is stored: GPTQ codes of `bits` in groups of `group_size`, or bits 16: left unquantized
    (its `weight` in the model's dtype, as a plain Linear)."""

    bits: int
    group_size: int | None = None  # None when unquantized

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def tag(self) -> str:
        """A short name ("4g128", "8g-1", "16"): the manifest's and the progress folder's."""
        return f"{self.bits}g{self.group_size}" if self.quantized else "16"


UNQUANTIZED = LinearFormat(16)

# vLLM loads these groups as one fused Linear under this name and matches `dynamic` keys against it;
# it refuses a fused layer whose shards disagree, so a group always gets one format.
VLLM_FUSED_NAMES = {
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn.qkv_proj",
    ("mlp.gate_proj", "mlp.up_proj"): "mlp.gate_up_proj",
}


# The GPTQ codes vLLM loads, as (bits, symmetric): its one GPTQ config (AutoGPTQConfig in 0.32, Marlin kernels
# only) raises on any other, whether the config's own or a "dynamic" override's; unquantized modules are fine.
VLLM_GPTQ_CODES = ((4, True), (8, True))


def vllm_refusal(codes: Iterable[tuple[int, bool]]) -> str | None:
    """Why vLLM would refuse a GPTQ checkpoint whose quantized Linears have these (bits, symmetric) codes (the
    config's own among them); None when it loads it."""
    for bits, sym in codes:
        if (bits, sym) not in VLLM_GPTQ_CODES:
            grid = "symmetric" if sym else "asymmetric"
            return f"vLLM loads GPTQ only as 4- or 8-bit symmetric codes, and this checkpoint has {bits}-bit {grid} ones"
    return None


def config_codes(quantization: dict) -> list[tuple[int, bool]]:
    """The (bits, symmetric) codes a GPTQ quantization_config gives: its own, and each "dynamic" override's."""
    base = (quantization.get("bits", 4), quantization.get("sym", True))
    overrides = [(o.get("bits", base[0]), o.get("sym", base[1]))
                 for key, o in (quantization.get("dynamic") or {}).items() if not key.startswith("-:")]
    return [base, *overrides]


def dynamic_map(formats: dict[str, LinearFormat], base: LinearFormat, arch: Architecture,
                allow_split: bool = False) -> dict[str, dict]:
    """quantization_config's "dynamic": per-module formats as gptqmodel and vLLM read them.

    Keys are regular expressions matched (re.match) against a module's full name, first match wins:
    "+:REGEX" overrides bits / group_size, "-:REGEX" leaves the module unquantized. One key per group
    (q/k/v, o, gate/up, down) and format, naming the layers that take it; modules not named keep `base`.
    formats: full checkpoint module name -> its format (all members of a group alike, unless allow_split:
    then a split group gets a key per module, which gptqmodel and lowbit read but vLLM's fused layers refuse).
    """
    layers: dict[tuple[tuple[str, ...], LinearFormat], list[int]] = {}
    for i in range(arch.num_layers):
        for group in arch.groups:
            chosen = {name: formats.get(arch.layer_prefix(i) + name, base) for name in group}
            if len(set(chosen.values())) == 1:
                keys = [(group, chosen[group[0]])]
            elif allow_split:
                keys = [((name,), fmt) for name, fmt in chosen.items()]
            else:
                raise ValueError(f"layer {i}: the modules of {', '.join(group)} must share one format")
            for names, fmt in keys:
                if fmt != base:
                    layers.setdefault((names, fmt), []).append(i)
    prefixes = "|".join(re.escape(p) for p in sorted({arch.text_prefix, arch.loaded_text_prefix}))
    dynamic = {}
    for (group, fmt), indices in layers.items():
        names = [*group, *([VLLM_FUSED_NAMES[group]] if group in VLLM_FUSED_NAMES else [])]
        pattern = (rf"(?:{prefixes})layers\.(?:{'|'.join(map(str, indices))})\."
                   rf"(?:{'|'.join(map(re.escape, names))})$")
        if fmt.quantized:
            dynamic["+:" + pattern] = {"bits": fmt.bits, "group_size": fmt.group_size}
        else:
            dynamic["-:" + pattern] = {}
    return dynamic


def dynamic_format(dynamic: dict | None, names: Iterable[str], base: LinearFormat) -> LinearFormat:
    """The format "dynamic" gives a module (any of its names: checkpoint's, loaded), as gptqmodel and vLLM
    read it: the first key that matches decides; a key without "+:" or "-:" is a positive one."""
    names = list(names)
    for key, override in (dynamic or {}).items():
        negative = key.startswith("-:")
        pattern = key[2:] if negative or key.startswith("+:") else key
        try:
            matched = any(re.match(pattern, name) for name in names)
        except re.error as e:
            raise CorruptInputError(f"quantization_config.dynamic key {key!r} is not a regular expression: {e}") from None
        if matched:
            if negative:
                return UNQUANTIZED
            return LinearFormat(override.get("bits", base.bits), override.get("group_size", base.group_size))
    return base


def quantization_config(settings: QuantizeSettings, arch: Architecture, dynamic: dict | None = None) -> dict:
    """config.json's "quantization_config" (also written as quantize_config.json), as AutoGPTQ spells it."""
    quantization = {
        "quant_method": "gptq",
        "bits": settings.bits,
        "group_size": settings.group_size,
        # act-order with static groups keeps groups in column order: g_idx is k // group_size
        "desc_act": settings.act_order and not settings.static_groups,
        "sym": settings.sym,
        "checkpoint_format": "gptq",
        "damp_percent": settings.damp,
        "true_sequential": settings.true_sequential,
        "static_groups": settings.static_groups,
        "lm_head": False,
        "meta": {"quantizer": [f"lowbit:{__version__}"], "method": settings.method},
    }
    if dynamic:
        quantization["dynamic"] = dynamic
    if arch.multimodal:  # only the language model's decoder layers: the vision tower stays dense
        quantization["block_name_to_quantize"] = arch.loaded_text_prefix + "layers"
        quantization["modules_in_block_to_quantize"] = [list(group) for group in arch.groups]
    return quantization


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """int codes [K, N] -> int32 [K * bits / 32, N], packed along dim 0. K * bits must be a multiple of 32."""
    n_rows, n_cols = codes.shape
    if (n_rows * bits) % 32:
        raise ValueError(f"{n_rows} rows of {bits}-bit codes do not fill whole 32-bit words")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes outside 0..{2**bits - 1} cannot be packed in {bits} bits")
    word, shift = _stream_position(n_rows, bits, codes.device)
    packed = torch.empty(n_rows * bits // 32, n_cols, dtype=torch.int32, device=codes.device)
    for columns in _column_chunks(n_rows, n_cols):  # int64 temporaries of a chunk, not of the whole matrix
        shifted = codes[:, columns].to(torch.int64) << shift.unsqueeze(1)  # at most 31 + 8 bits: fits int64
        # Bits are disjoint, so adding is OR. A value's bits past bit 31 go to the next word.
        words = torch.zeros(packed.shape[0] + 1, shifted.shape[1], dtype=torch.int64, device=codes.device)
        words.index_add_(0, word, shifted & LOW_32_BITS)
        words.index_add_(0, word + 1, shifted >> 32)
        packed[:, columns] = _to_int32_bits(words[:-1])
    return packed


def unpack_rows(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of pack_rows: int32 [rows * bits / 32, N] -> int32 codes [rows, N]."""
    if packed.shape[0] * 32 != rows * bits:
        raise ValueError(f"{packed.shape[0]} words do not hold {rows} values of {bits} bits")
    word, shift = _stream_position(rows, bits, packed.device)
    codes = torch.empty(rows, packed.shape[1], dtype=torch.int32, device=packed.device)
    for columns in _column_chunks(rows, packed.shape[1]):
        words = packed[:, columns].to(torch.int64) & LOW_32_BITS  # the unsigned value of each word
        words = torch.cat([words, torch.zeros_like(words[:1])])
        # The low bits of the next word hold the rest of a value that straddles two words.
        both = words[word] | ((words[word + 1] & 0xFF) << 32)
        codes[:, columns] = ((both >> shift.unsqueeze(1)) & (2**bits - 1)).to(torch.int32)
    return codes


def pack_gptq_v1(q: QuantizedWeight, bias: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors of one quantized Linear, keyed by suffix: qweight, qzeros, scales, g_idx (and bias)."""
    if (q.zeros < 1).any():
        raise ValueError("GPTQ v1 stores zero points minus one: a zero point of 0 cannot be stored")
    tensors = {
        "qweight": pack_rows(q.codes.T, q.bits),
        "qzeros": pack_rows((q.zeros.to(torch.int64) - 1).T, q.bits).T.contiguous(),
        "scales": q.scales.to(torch.float16).contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16).contiguous()
    return tensors


def unpack_gptq_v1(tensors: dict[str, Tensor], bits: int) -> QuantizedWeight:
    """The codes, scales, true zero points and g_idx of GPTQ v1 tensors (keys as pack_gptq_v1 writes)."""
    missing = set(TENSOR_SUFFIXES) - tensors.keys()
    if missing:
        raise CorruptInputError(f"GPTQ tensors missing: {', '.join(sorted(missing))}")
    g_idx = tensors["g_idx"].to(torch.int32)
    scales = tensors["scales"].to(torch.float32)
    codes = unpack_rows(tensors["qweight"], bits, rows=g_idx.numel()).T
    zeros = unpack_rows(tensors["qzeros"].T, bits, rows=scales.shape[1]).T + 1
    return QuantizedWeight(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scales,
        zeros=zeros.contiguous(),
        g_idx=g_idx,
        bits=bits,
    )


def dequantize_gptq_v1(tensors: dict[str, Tensor], bits: int) -> Tensor:
    """Dense float32 weight [N, K] of GPTQ v1 tensors."""
    return unpack_gptq_v1(tensors, bits).dequantize()


def _column_chunks(n_rows: int, n_cols: int) -> list[slice]:
    """Column ranges of about CHUNK_VALUES values each (at least one column)."""
    step = max(1, CHUNK_VALUES // max(n_rows, 1))
    return [slice(start, start + step) for start in range(0, n_cols, step)]


def _stream_position(n_values: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For each value in a packed run: the word its lowest bit is in, and the bit offset there."""
    offset = torch.arange(n_values, device=device) * bits
    return offset // 32, offset % 32


def _to_int32_bits(words: Tensor) -> Tensor:
    """int64 values in [0, 2**32) -> int32 with the same 32 bits (values >= 2**31 come out negative)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
