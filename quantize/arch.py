"""The architectures lowbit quantizes, and how their decoder layers are laid out.

Every supported model is a decoder-only `*ForCausalLM` whose decoder layers
live at `model.layers.{i}` and whose projections are `nn.Linear`. What differs
is the names of the projections. Each architecture lists them in groups, in
forward order; the modules of one group read the same input, so they share a
Hessian (this is also the unit of GPTQ's "true sequential" order).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import UsageError

LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# Phi-3 and Phi-4 keep q/k/v and gate/up fused: quantize them fused, keep the names.
PHI3_GROUPS = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)

LINEAR_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "LlamaForCausalLM": LLAMA_GROUPS,
    "MistralForCausalLM": LLAMA_GROUPS,
    "Qwen2ForCausalLM": LLAMA_GROUPS,
    "Qwen3ForCausalLM": LLAMA_GROUPS,
    "Phi3ForCausalLM": PHI3_GROUPS,
}


@dataclass(frozen=True)
class Architecture:
    name: str
    num_layers: int
    groups: tuple[tuple[str, ...], ...]

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def linear_names(self) -> list[str]:
        """Names of the quantized Linears inside one decoder layer, in forward order."""
        return [name for group in self.groups for name in group]


def architecture_of(config: dict) -> Architecture:
    names = config.get("architectures") or []
    if not names:
        raise UsageError("config.json names no architecture ('architectures' is missing)")
    name = names[0]
    if name not in LINEAR_GROUPS:
        supported = ", ".join(sorted(LINEAR_GROUPS))
        raise UsageError(f"unsupported architecture {name} (lowbit supports {supported})")
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise UsageError("config.json has no valid num_hidden_layers")
    return Architecture(name=name, num_layers=layers, groups=LINEAR_GROUPS[name])
