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
class LayerNorms:
    """The norms around a decoder layer's two residual branches, by module name (None: no such norm).

    With them, true-sequential quantization runs the layer's second half itself, from the residual
    stream after attention, instead of re-running attention for every group (quantize/stream.py).
    """

    before_mlp: str = "post_attention_layernorm"
    after_attention: str | None = None  # applied to attention's output before the residual add
    after_mlp: str | None = None  # applied to the MLP's output before the residual add


# hidden + attention(norm(hidden)), then that + mlp(post_attention_layernorm(that))
PRE_NORM = LayerNorms()
# Gemma 3 normalises each branch's output too, before adding it to the residual stream
SANDWICH_NORM = LayerNorms(before_mlp="pre_feedforward_layernorm", after_attention="post_attention_layernorm",
                           after_mlp="post_feedforward_layernorm")
# architectures not listed are quantized by re-running the whole layer for each group (slower, same result)
LAYER_NORMS: dict[str, LayerNorms] = {
    "LlamaForCausalLM": PRE_NORM,
    "MistralForCausalLM": PRE_NORM,
    "Qwen2ForCausalLM": PRE_NORM,
    "Qwen3ForCausalLM": PRE_NORM,
    "Phi3ForCausalLM": PRE_NORM,
    "Gemma3ForCausalLM": SANDWICH_NORM,
}


@dataclass(frozen=True)
class Architecture:
    name: str
    num_layers: int
    groups: tuple[tuple[str, ...], ...]
    norms: LayerNorms | None = None  # None: the layer's residual layout is not described

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
    return Architecture(name=name, num_layers=layers, groups=LINEAR_GROUPS[name], norms=LAYER_NORMS.get(name))
