"""The architectures lowbit quantizes, and how their decoder layers are laid out.

Every supported model is a decoder-only language model whose decoder layers
live at `{text_prefix}layers.{i}` and whose projections are `nn.Linear`. What
differs is the names of the projections, and, for a multimodal model, where its
language model sits in the checkpoint (the vision tower and projector are kept
as they are). Each architecture lists its projections in groups, in forward
order; the modules of one group read the same input, so they share a Hessian
(this is also the unit of GPTQ's "true sequential" order).
"""

from __future__ import annotations

from collections.abc import Callable
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
    "Gemma3ForCausalLM": LLAMA_GROUPS,  # q_norm/k_norm and four norms per layer stay in 16-bit
    "Gemma3ForConditionalGeneration": LLAMA_GROUPS,
}

# Multimodal models: where the language model lives in the checkpoint (Google's checkpoints and
# transformers 5's save_pretrained write the first spelling; the second is the loaded model's own
# module names, which some tools save), and the top-level modules kept unquantized.
TEXT_PREFIXES: dict[str, tuple[str, ...]] = {
    "Gemma3ForConditionalGeneration": ("language_model.model.", "model.language_model."),
}
UNQUANTIZED_MODULES: dict[str, tuple[str, ...]] = {
    "Gemma3ForConditionalGeneration": ("vision_tower", "multi_modal_projector"),
}
# How transformers names the language model's modules once loaded: quantization_config's module lists
# (bitsandbytes' skips, GPTQ's block) speak these names, not the checkpoint's.
LOADED_TEXT_PREFIX = {"Gemma3ForConditionalGeneration": "model.language_model."}
# Norm weights of one decoder layer, as multiples of (hidden, head_dim): Gemma 3 has four norms
# around attention and MLP, and q_norm / k_norm over each head.
NORM_COUNTS: dict[str, tuple[int, int]] = {
    "Gemma3ForCausalLM": (4, 2),
    "Gemma3ForConditionalGeneration": (4, 2),
}

# What a config.json may leave out because the model's config class defaults it.
TIED_BY_DEFAULT = {"Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"}


@dataclass(frozen=True)
class LayerNorms:
    """The norms around a decoder layer's two residual branches, by module name (None: no such norm).

    With them, true-sequential quantization runs the layer's second half itself, from the residual
    stream after attention, instead of re-running attention for every group (quantize/steps.py).
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
    "Gemma3ForConditionalGeneration": SANDWICH_NORM,
}


@dataclass(frozen=True)
class Architecture:
    name: str
    num_layers: int
    groups: tuple[tuple[str, ...], ...]
    text_prefix: str = "model."  # the language model's embeddings, layers and final norm
    unquantized_modules: tuple[str, ...] = ()  # whole top-level modules copied as they are (a vision tower)
    norms: LayerNorms | None = None  # None: the layer's residual layout is not described

    def layer_prefix(self, index: int) -> str:
        return f"{self.text_prefix}layers.{index}."

    @property
    def layers_prefix(self) -> str:
        return f"{self.text_prefix}layers."

    @property
    def embed_name(self) -> str:
        return f"{self.text_prefix}embed_tokens.weight"

    @property
    def norm_prefix(self) -> str:
        return f"{self.text_prefix}norm."

    @property
    def multimodal(self) -> bool:
        return bool(self.unquantized_modules)

    @property
    def loaded_text_prefix(self) -> str:
        return LOADED_TEXT_PREFIX.get(self.name, "model.")

    def loaded_name(self, name: str) -> str:
        """The module name transformers gives a checkpoint name once the model is loaded."""
        if name.startswith(self.text_prefix):
            return self.loaded_text_prefix + name[len(self.text_prefix):]
        if self.multimodal and not name.startswith("model."):
            return "model." + name  # the vision tower and projector of a checkpoint in Google's spelling
        return name

    def loaded_unquantized_modules(self) -> list[str]:
        return [f"model.{m}" for m in self.unquantized_modules]

    def linear_names(self) -> list[str]:
        """Names of the quantized Linears inside one decoder layer, in forward order."""
        return [name for group in self.groups for name in group]

    def quantized_linears(self, is_skipped: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Full names of the Linears a checkpoint stores quantized: every decoder layer's, less the skipped."""
        return [self.layer_prefix(i) + name for i in range(self.num_layers) for name in self.linear_names()
                if not is_skipped(self.layer_prefix(i) + name)]


def text_config(config: dict) -> dict:
    """The part of config.json that describes the language model (a multimodal model's `text_config`)."""
    names = config.get("architectures") or []
    if names and names[0] in TEXT_PREFIXES:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise UsageError(f"config.json of {names[0]} has no text_config")
        return text
    return config


def layer_norm_params(name: str, hidden: int, head_dim: int) -> int:
    per_hidden, per_head = NORM_COUNTS.get(name, (2, 0))
    return per_hidden * hidden + per_head * head_dim


def tied_embeddings(config: dict) -> bool:
    """Whether the head is the embedding matrix (no lm_head of its own)."""
    names = config.get("architectures") or [None]
    default = config.get("tie_word_embeddings", names[0] in TIED_BY_DEFAULT)
    return bool(text_config(config).get("tie_word_embeddings", default))


def architecture_of(config: dict, tensor_names=None) -> Architecture:
    """The layout of a model; `tensor_names` (the checkpoint's) picks how a multimodal checkpoint spells it."""
    names = config.get("architectures") or []
    if not names:
        raise UsageError("config.json names no architecture ('architectures' is missing)")
    name = names[0]
    if name not in LINEAR_GROUPS:
        supported = ", ".join(sorted(LINEAR_GROUPS))
        raise UsageError(f"unsupported architecture {name} (lowbit supports {supported})")
    text = text_config(config)
    layers = text.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise UsageError("config.json has no valid num_hidden_layers")
    if text.get("final_logit_softcapping") is not None:  # the evaluator's head is a plain projection
        raise UsageError(f"{name} with final_logit_softcapping is not supported")
    return Architecture(name=name, num_layers=layers, groups=LINEAR_GROUPS[name],
                        text_prefix=_text_prefix(name, tensor_names),
                        unquantized_modules=UNQUANTIZED_MODULES.get(name, ()), norms=LAYER_NORMS.get(name))


def _text_prefix(name: str, tensor_names) -> str:
    candidates = TEXT_PREFIXES.get(name, ("model.",))
    if tensor_names is None:
        return candidates[0]
    names = set(tensor_names)
    for prefix in candidates:
        if f"{prefix}embed_tokens.weight" in names:
            return prefix
    return candidates[0]


# ---- the sizes memory depends on (lowbit plan), from config.json alone ----

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Linear:
    name: str
    out_features: int  # N
    in_features: int  # K

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, from config.json."""

    architecture: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    source_bytes: int  # bytes per weight in the checkpoint
    groups: tuple[tuple[Linear, ...], ...]  # one decoder layer's Linears; a group shares one input (and Hessian)
    layer_other_params: int  # norms and biases of one decoder layer

    @property
    def linears(self) -> list[Linear]:
        return [linear for group in self.groups for linear in group]

    @property
    def layer_params(self) -> int:
        return sum(linear.weights for linear in self.linears) + self.layer_other_params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden


def _linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every projection name lowbit knows."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
        "self_attn.qkv_proj": (q + 2 * kv, hidden), "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
        "mlp.gate_up_proj": (2 * intermediate, hidden), "mlp.down_proj": (hidden, intermediate),
    }


def model_shape(config: dict) -> ModelShape:
    names = config.get("architectures") or []
    if not names or names[0] not in LINEAR_GROUPS:
        raise UsageError(f"unsupported architecture {names[0] if names else '(none)'} "
                         f"(lowbit supports {', '.join(sorted(LINEAR_GROUPS))})")
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    tied = tied_embeddings(config)
    config = text_config(config)  # a multimodal model's language model
    try:
        hidden, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
        heads, layers, vocab = int(config["num_attention_heads"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"config.json lacks a usable {e}") from None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    shapes = _linear_shapes(hidden, intermediate, heads, kv_heads, head_dim)
    groups = tuple(tuple(Linear(name, *shapes[name]) for name in group) for group in LINEAR_GROUPS[names[0]])
    biased = names[0] == "Qwen2ForCausalLM" or bool(config.get("attention_bias"))
    biases = sum(shapes[n][0] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")) if biased else 0
    return ModelShape(
        architecture=names[0], layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab,
        tied=tied, source_bytes=DTYPE_BYTES.get(str(dtype), 2),
        groups=groups, layer_other_params=layer_norm_params(names[0], hidden, head_dim) + biases,
    )
