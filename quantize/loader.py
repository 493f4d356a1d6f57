"""Read any checkpoint lowbit handles as dense float weights: plain, GPTQ, bitsandbytes.

`DenseWeights.read_prefix("model.layers.3.")` gives that layer's weights as an
ordinary state dict, dequantized the way a loader computes them. The
evaluator uses it one layer at a time; `load_dequantized_model` uses it for a
whole (small) model, without gptqmodel or a GPU.

Checkpoints of other tools read the same way:
- GPTQ from AutoGPTQ, GPTQModel and the like: the settings from config.json's
  `quantization_config` or, for older saves, `quantize_config.json`; act-order
  (a permuted `g_idx`), asymmetric zero points, `checkpoint_format` "gptq"
  (zeros stored minus one) or "gptq_v2" (stored as they are); a missing
  `g_idx` means `k // group_size`; a `dynamic` map (per-module bits and group size, modules left
  unquantized) is read as gptqmodel and vLLM read it (pack.dynamic_format).
- transformers' bitsandbytes saves: 4-bit (NF4/FP4, with or without double
  quantization) and 8-bit (`weight` int8 with its row scales `SCB`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import CorruptInputError, UsageError
from lowbit.quantize.arch import architecture_of, tied_embeddings
from lowbit.quantize.checkpoint import SafetensorsCheckpoint, load_config_dict
from lowbit.quantize.nf4 import STATE_KEY, dequantize_bnb
from lowbit.quantize.pack import TENSOR_SUFFIXES, LinearFormat, dynamic_format, unpack_gptq_v1
from lowbit.quantize.stream import build_skeleton, load_config, load_weights

GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQFormat:
    """What a GPTQ checkpoint's tensors need to be read: bits, group size, how zeros are stored."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row
    checkpoint_format: str = "gptq"  # "gptq" (v1: zeros stored minus one) or "gptq_v2" (zeros as they are)


def quantization_settings(folder: Path, config: dict) -> dict:
    """config.json's quantization_config, else quantize_config.json (AutoGPTQ's older saves), else {}."""
    settings = config.get("quantization_config")
    if isinstance(settings, dict) and settings:
        return settings
    file = Path(folder) / "quantize_config.json"
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise CorruptInputError(f"{file} is not valid JSON") from None
    if not isinstance(settings, dict):
        raise CorruptInputError(f"{file} is not a JSON object")
    return {"quant_method": "gptq", **settings}


def gptq_format(settings: dict) -> GPTQFormat:
    fmt = settings.get("checkpoint_format") or settings.get("format") or "gptq"
    bits, group_size = settings.get("bits", 4), settings.get("group_size", 128)
    if fmt not in GPTQ_FORMATS:
        raise UsageError(f"GPTQ checkpoint format {fmt!r} is not readable here (only {', '.join(GPTQ_FORMATS)})")
    if bits not in (2, 3, 4, 8) or not isinstance(group_size, int):
        raise CorruptInputError(f"GPTQ settings bits={bits!r}, group_size={group_size!r} are not valid")
    return GPTQFormat(bits=bits, group_size=group_size, checkpoint_format=fmt)


def dequantize_gptq(parts: dict[str, torch.Tensor], fmt: GPTQFormat) -> torch.Tensor:
    """Dense float32 [N, K] of one module's GPTQ tensors, as the loaders compute it."""
    if "g_idx" not in parts:  # some exports leave it out when it is the identity grouping
        in_features = parts["qweight"].shape[0] * 32 // fmt.bits
        group_size = fmt.group_size if fmt.group_size > 0 else in_features
        parts = {**parts, "g_idx": torch.arange(in_features, dtype=torch.int32) // group_size}
    q = unpack_gptq_v1(parts, fmt.bits)
    if fmt.checkpoint_format == "gptq_v2":
        q = replace(q, zeros=q.zeros - 1)  # unpack_gptq_v1 adds the v1 offset back
    return q.dequantize()


def dequantize_int8(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """bitsandbytes 8-bit (LLM.int8) weight: int8 codes [N, K] times their row absmax SCB / 127."""
    return parts["weight"].to(torch.float32) * (parts["SCB"].to(torch.float32) / 127).unsqueeze(1)


class DenseWeights:
    """A checkpoint folder whose tensors come out dequantized, one prefix at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = load_config_dict(self.folder)
        self.checkpoint = SafetensorsCheckpoint(self.folder)
        self.quantization = quantization_settings(self.folder, self.config)
        self.method = self.quantization.get("quant_method")  # None, "gptq" or "bitsandbytes"
        has_gptq = any(name.endswith(".qweight") for name in self.checkpoint.names())
        self.gptq = gptq_format(self.quantization) if has_gptq else None
        if has_gptq and self.method != "gptq":
            raise UsageError(f"{folder} has GPTQ tensors but neither config.json nor quantize_config.json "
                             "says how they were made (bits, group size)")

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        # grouped by full names, so that a prefix ending at a module ("lm_head.") works too
        raw = {prefix + name: tensor for name, tensor in self.checkpoint.read_prefix(prefix).items()}
        return {name[len(prefix) :]: tensor for name, tensor in self._dense(raw).items()}

    def _dense(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dense: dict[str, torch.Tensor] = {}
        for module in sorted({name[: -len(".qweight")] for name in raw if name.endswith(".qweight")}):
            parts = {key: raw.pop(f"{module}.{key}") for key in TENSOR_SUFFIXES if f"{module}.{key}" in raw}
            dense[f"{module}.weight"] = dequantize_gptq(parts, self.module_format(module))
        for state_key in [name for name in raw if STATE_KEY in name]:
            module = state_key.split(".weight.quant_state.")[0]
            parts = {name[len(module) + 1 :]: raw.pop(name) for name in list(raw) if name.startswith(module + ".weight")}
            state = json.loads(bytes(parts[state_key[len(module) + 1 :]].tolist()).decode())
            dense[f"{module}.weight"] = dequantize_bnb(parts, tuple(state["shape"]))
        for module in [name[: -len(".SCB")] for name in raw if name.endswith(".SCB")]:
            parts = {"weight": raw.pop(f"{module}.weight"), "SCB": raw.pop(f"{module}.SCB")}
            raw.pop(f"{module}.weight_format", None)  # older transformers saves: the layout's name
            dense[f"{module}.weight"] = dequantize_int8(parts)
        dense.update(raw)
        return dense

    def module_format(self, module: str) -> GPTQFormat:
        """The GPTQ format of one module: the checkpoint's, or what its `dynamic` map says for it."""
        base = LinearFormat(self.gptq.bits, self.gptq.group_size)
        fmt = dynamic_format(self.quantization.get("dynamic"), [module], base)
        if fmt == base:
            return self.gptq
        if not fmt.quantized:
            raise CorruptInputError(f"{module} has GPTQ tensors, but the dynamic map leaves it unquantized")
        return gptq_format({**self.quantization, "bits": fmt.bits, "group_size": fmt.group_size})

    def read(self, name: str) -> torch.Tensor:
        module = name.rsplit(".", 1)[0] + "."
        return self.read_prefix(module)[name[len(module) :]]

    def lm_head_weight(self) -> torch.Tensor:
        """The output projection (dequantized when a tool quantized it); tied models keep only the embedding."""
        if any(name.startswith("lm_head.") for name in self.checkpoint.names()):
            return self.read("lm_head.weight")
        return self.read(architecture_of(self.config, self.checkpoint.names()).embed_name)


def load_dequantized_model(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The language model as an ordinary transformers model with dense weights (for small models and tests).

    A multimodal checkpoint gives its language model alone (a `*ForCausalLM`, as lowbit evaluates it).
    """
    weights = DenseWeights(folder)
    config = load_config(folder)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = build_skeleton(config)
    arch = architecture_of(weights.config, weights.checkpoint.names())
    state = {"model." + name: t for name, t in weights.read_prefix(arch.text_prefix).items()}
    if "lm_head.weight" in weights.checkpoint:
        state["lm_head.weight"] = weights.checkpoint.read("lm_head.weight")
    tied = tied_embeddings(weights.config)
    if "lm_head.weight" not in state and tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    load_weights(model, state, torch.device(device), dtype)
    if tied:
        model.tie_weights()
    model.model.rotary_emb.to(device)
    return model
