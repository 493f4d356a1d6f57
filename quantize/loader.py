"""Read any checkpoint lowbit handles as dense float weights: plain, GPTQ v1, bitsandbytes 4-bit.

`DenseWeights.read_prefix("model.layers.3.")` gives that layer's weights as an
ordinary state dict, dequantized the way a loader computes them. The
evaluator uses it one layer at a time; `load_dequantized_model` uses it for a
whole (small) model, without gptqmodel or a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantize.arch import architecture_of, tied_embeddings
from quantize.checkpoint import SafetensorsCheckpoint, load_config_dict
from quantize.nf4 import dequantize_bnb
from quantize.pack import dequantize_gptq_v1

GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
BNB_STATE_KEY = "weight.quant_state.bitsandbytes__"


class DenseWeights:
    """A checkpoint folder whose tensors come out dequantized, one prefix at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = load_config_dict(self.folder)
        self.checkpoint = SafetensorsCheckpoint(self.folder)
        quantization = self.config.get("quantization_config") or {}
        self.method = quantization.get("quant_method")  # None, "gptq" or "bitsandbytes"
        self.bits = quantization.get("bits", 4)

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        raw = self.checkpoint.read_prefix(prefix)
        dense: dict[str, torch.Tensor] = {}
        for module in sorted({name[: -len(".qweight")] for name in raw if name.endswith(".qweight")}):
            parts = {key: raw.pop(f"{module}.{key}") for key in GPTQ_KEYS}
            dense[f"{module}.weight"] = dequantize_gptq_v1(parts, self.bits)
        for state_key in [name for name in raw if BNB_STATE_KEY in name]:
            module = state_key.split(".weight.quant_state.")[0]
            parts = {name[len(module) + 1 :]: raw.pop(name) for name in list(raw) if name.startswith(module + ".weight")}
            state = json.loads(bytes(parts[state_key[len(module) + 1 :]].tolist()).decode())
            dense[f"{module}.weight"] = dequantize_bnb(parts, tuple(state["shape"]))
        dense.update(raw)
        return dense

    def read(self, name: str) -> torch.Tensor:
        module = name.rsplit(".", 1)[0] + "."
        return self.read_prefix(module)[name[len(module) :]]

    def lm_head_weight(self) -> torch.Tensor:
        """The output projection; tied models keep only the embedding."""
        if "lm_head.weight" in self.checkpoint:
            return self.checkpoint.read("lm_head.weight")
        return self.checkpoint.read(architecture_of(self.config, self.checkpoint.names()).embed_name)


def load_dequantized_model(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The language model as an ordinary transformers model with dense weights (for small models and tests).

    A multimodal checkpoint gives its language model alone (a `*ForCausalLM`, as lowbit evaluates it).
    """
    from quantize.stream import build_skeleton, load_config, load_weights

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
