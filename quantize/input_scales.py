"""Activation-aware input scales (AWQ, Lin et al. 2023) before GPTQ, folded so that the checkpoint stays plain GPTQ.

A Linear computes the same thing when input column j is divided by s_j and weight column j multiplied by it.
The quantization grid is not the same: a group's step is set by its largest weights, so a column scaled up
is stored finer relative to its own values, and the inputs that carry the most activation can be given that
room. Per group of Linears that read one input:

    s = rms(x)^alpha / (its geometric middle), alpha in ALPHAS (0 first: s = 1, nothing changes)
    alpha: least round-to-nearest output error sum over the group of tr(E H E^T), E = W - RTN(W s) / s

GPTQ then solves W s against the Hessian of x / s (S^-1 H S^-1), and the 1 / s goes into what makes x:

- q/k/v and gate/up: the norm before them (Gemma 3's norm multiplies by 1 + weight: see NORM_OFFSET);
- o_proj: v_proj's rows; the query heads that read one value head share its scales;
- down_proj: up_proj's rows (the MLP's product act(gate) * up is linear in up).

A row scale of a quantized producer is its group scales times 1 / s, the same codes: stored in float16, so
the checkpoint computes what the solver produced up to float16. A norm's s is made the one its folded weight
realises in the checkpoint's dtype (representable_norm_scale): there bfloat16 would otherwise move it by up to
2.6 %, and on Gemma-3-270M that cost most of the gain (BENCHMARKS.md, "quality-gemma3-awq").

Under a size budget every candidate format is solved on W s, and the fold divides every candidate's rows; a Linear
left in 16 bits is stored as W s with its producer rows divided too (dense_tensors), from the source weight and
the layer's scales, which the progress folder keeps (SCALES_TAG): a 16-bit copy of every Linear would be as large
as the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.quantize.arch import Architecture, text_config
from lowbit.quantize.distributed import Ranks
from lowbit.quantize.gptq import GPTQConfig
from lowbit.quantize.grid import dequantize_codes, grid_params, quantize_to_codes
from lowbit.quantize.settings import QuantizeSettings

ALPHAS = tuple(i / 20 for i in range(20))
# rows of a group's stacked Linears, strided (so fused q|k|v and q, k, v apart sample the same rows): the search's
# error is an estimate, its cost rows x K x K a candidate
SEARCH_ROWS = 128
SCALES_TAG = "input-scales"  # the progress folder's candidate tag for a layer's group scales (names: scale_name)
NORM_OFFSET = {"Gemma3ForCausalLM": 1.0, "Gemma3ForConditionalGeneration": 1.0}  # the norm computes x * (offset + w)


@dataclass(frozen=True)
class Producer:
    """What makes a group's input: a norm (`norm`: its name), or `rows` of a Linear's output (`linear`).
    values: the rows are v_proj's, read by the query heads in o_proj's columns (they share scales)."""

    norm: str | None = None
    linear: str | None = None
    rows: tuple[int, int] | None = None  # [start, end) of its output rows; None: all
    values: bool = False


@dataclass(frozen=True)
class InputScaling:
    """What a run needs to scale each group's input: the producers of arch.groups' inputs, in order."""

    groups: tuple[tuple[str, ...], ...]  # arch.groups
    producers: tuple[Producer, ...]
    value_heads: tuple[int, int]  # value_heads(config)
    norm_offset: float
    config: GPTQConfig

    @classmethod
    def of(cls, arch: Architecture, config: dict, settings: QuantizeSettings) -> InputScaling | None:
        """None where the settings ask for no input scales, or the layout is not one this module knows."""
        text = text_config(config)
        found = producers(arch, text) if settings.awq_scales else None
        if found is None:
            return None
        return cls(tuple(arch.groups), tuple(found), value_heads(text), NORM_OFFSET.get(arch.name, 0.0), GPTQConfig.from_settings(settings))

    def search(self, group: int, weights: list[Tensor], hessian: Tensor, layer_tensors: dict[str, Tensor]) -> Tensor:
        """search_input_scale for arch.groups[group]; a norm's scale made one its folded weight realises exactly
        (LAYER_TENSORS: the layer's source tensors, names relative to it)."""
        producer = self.producers[group]
        scale = search_input_scale(weights, hessian, self.config, self.value_heads if producer.values else None)
        if producer.norm is not None:
            scale = representable_norm_scale(layer_tensors[producer.norm + ".weight"], scale, self.norm_offset)
        return scale

    def fold(self, tensors: dict[str, Tensor], prefix: str, group: int, scale: Tensor) -> None:
        """fold_into_producer for arch.groups[group] (o_proj's scales: one per value row, from its first query head)."""
        producer = self.producers[group]
        if producer.values:
            scale = scale.reshape(-1, *self.value_heads)[:, 0].reshape(-1)
        fold_into_producer(tensors, prefix, producer, scale, self.norm_offset)

    def fold_everywhere(self, out: dict[str, Tensor], candidates: dict[str, dict[str, Tensor]], prefix: str,
                        group: int, scale: Tensor, under_budget: bool) -> None:
        """fold into the layer's tensors to write (OUT) and, under a size budget, into every other candidate format
        of a producing Linear (CANDIDATES, by tag), the scale itself filed there for dense_tensors (SCALES_TAG)."""
        self.fold(out, prefix, group, scale)
        if not under_budget:
            return
        if self.producers[group].linear is not None:
            for tag, tensors in candidates.items():
                if tag != SCALES_TAG:
                    self.fold(tensors, prefix, group, scale)
        candidates.setdefault(SCALES_TAG, {})[scale_name(prefix, group)] = scale.cpu()

    def dense_tensors(self, tensors: dict[str, Tensor], prefix: str, module: str,
                      scales: dict[int, Tensor]) -> dict[str, Tensor]:
        """What a Linear left unquantized stores where its layer's inputs are scaled: its weight (TENSORS: its
        source tensors, full names) times its group's scale, its rows divided by the scale of the group it
        produces for, as the quantized candidates are. SCALES: the layer's scale of each group, by index."""
        name, out = module[len(prefix):], dict(tensors)
        for index, group in enumerate(self.groups):
            if name in group and index in scales:
                weight = out[module + ".weight"]
                out[module + ".weight"] = (weight.float() * scales[index].to(weight.device)).to(weight.dtype)
        for index, producer in enumerate(self.producers):
            if producer.linear == name and index in scales:
                self.fold(out, prefix, index, scales[index])
        return out


def scale_name(prefix: str, group: int) -> str:
    """The name a layer's scale of arch.groups[group] is kept under in the progress folder (SCALES_TAG)."""
    return f"{prefix}input_scale.{group}"


def layer_scales(names, read: Callable[[str], Tensor], prefix: str) -> dict[int, Tensor]:
    """The scales scale_name filed for the layer at PREFIX, by group index: those of NAMES, each READ."""
    start = prefix + "input_scale."
    return {int(name[len(start):]): read(name) for name in names if name.startswith(start)}


def producers(arch: Architecture, config: dict) -> list[Producer] | None:
    """The producer of each of arch.groups' inputs, or None where the layout is not one this module knows."""
    if arch.norms is None or len(arch.groups) != 4:
        return None
    q, kv, intermediate = _widths(config)
    if arch.groups[0] == ("self_attn.qkv_proj",):  # Phi-3: fused q|k|v and gate|up
        value = Producer(linear="self_attn.qkv_proj", rows=(q + kv, q + 2 * kv), values=True)
        up = Producer(linear="mlp.gate_up_proj", rows=(intermediate, 2 * intermediate))
    else:
        value, up = Producer(linear="self_attn.v_proj", values=True), Producer(linear="mlp.up_proj")
    return [Producer(norm="input_layernorm"), value, Producer(norm=arch.norms.before_mlp), up]


def value_heads(config: dict) -> tuple[int, int]:
    """(How many query heads read each value head, the head width): how o_proj's input columns share v_proj's rows."""
    heads = int(config["num_attention_heads"])
    return heads // int(config.get("num_key_value_heads") or heads), _head_dim(config)


def search_input_scale(weights: list[Tensor], hessian: Tensor, config: GPTQConfig,
                       heads: tuple[int, int] | None = None) -> Tensor:
    """The scale s [K] of the group's input columns with the least RTN output error (module docstring).

    weights: the group's [N_i, K] matrices; hessian: their input's [K, K]. heads (o_proj): value_heads,
    the columns of the query heads that read one value head share its scales.
    """
    stacked = torch.cat(weights)
    samples = stacked[:: max(1, stacked.shape[0] // SEARCH_ROWS)].float()
    rms = hessian.diagonal().float().clamp_min(1e-12).sqrt()
    if heads is not None and heads[0] > 1:
        rms = _shared_across_heads(rms, *heads)
    best, least = torch.ones_like(rms), None
    for alpha in ALPHAS:
        scale = rms.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = rtn_output_error([samples], hessian, scale, config)
        if least is None or error < least:
            best, least = scale, error
    return best


def rtn_output_error(weights: list[Tensor], hessian: Tensor, scale: Tensor, config: GPTQConfig) -> float:
    """sum over WEIGHTS of tr(E H E^T), E = W - RTN(W s) / s on CONFIG's grid (min/max, no scale search)."""
    error = 0.0
    for w in weights:
        w = w.float()
        e = w - _round_to_nearest(w * scale, config) / scale
        error += float(((e @ hessian) * e).sum())
    return error


def _round_to_nearest(w: Tensor, config: GPTQConfig) -> Tensor:
    """gptq.rtn_quantize(w).dequantize() without scale search, every group of every row at once."""
    rows, columns = w.shape
    groups = w.reshape(-1, columns if config.group_size == -1 else config.group_size)
    scale, zero = grid_params(groups, config.bits, config.sym)
    return dequantize_codes(quantize_to_codes(groups, scale, zero, config.bits), scale, zero).reshape(rows, columns)


def group_input_scale(scaling: InputScaling | None, layer, layer_tensors: dict[str, Tensor], names: list[str],
                      owner: int, group: int, hessian: Tensor | None, ranks: Ranks) -> Tensor | None:
    """Group GROUP's input scales, searched by OWNER (the rank that solves its first Linear, NAMES[0]) and shared
    with every rank, and the Hessian made in place that of the scaled input; None without SCALING."""
    if scaling is None or not names:
        return None
    first = layer.get_submodule(names[0]).weight
    if ranks.rank == owner:
        scale = scaling.search(group, [layer.get_submodule(n).weight.detach() for n in names], hessian, layer_tensors)
    else:
        scale = torch.empty(first.shape[1], dtype=torch.float32, device=first.device)
    ranks.broadcast_(scale, owner)
    if hessian is not None:
        scaled_hessian_(hessian, scale)
    return scale


def scaled_hessian_(hessian: Tensor, scale: Tensor) -> Tensor:
    """The Hessian of x / s, in place: H_jk / (s_j s_k)."""
    return hessian.div_(scale[:, None]).div_(scale[None, :])


def representable_norm_scale(weight: Tensor, scale: Tensor, offset: float = 0.0) -> Tensor:
    """The scale that a norm WEIGHT divided by SCALE realises once stored in WEIGHT's dtype (bfloat16 moves a
    Gemma norm by up to 2**-9): (w + offset) / (folded + offset); SCALE itself where either is 0 (a dead input)."""
    w = weight.float().to(scale.device) + offset
    folded = folded_norm(weight, scale, offset).to(scale.device).float() + offset
    return torch.where((w != 0) & (folded != 0), w / folded, scale)


def folded_norm(weight: Tensor, scale: Tensor, offset: float = 0.0) -> Tensor:
    """A norm WEIGHT (computing x * (offset + w)) divided by SCALE, in WEIGHT's dtype and device."""
    return ((weight.float() + offset) / scale.to(weight.device) - offset).to(weight.dtype)


def fold_into_producer(tensors: dict[str, Tensor], prefix: str, producer: Producer, scale: Tensor,
                       norm_offset: float = 0.0) -> None:
    """Divide what PRODUCER writes by SCALE, in the layer's tensors to write (names prefixed by PREFIX):
    a norm's weight, or a Linear's rows (GPTQ: its group scales, float16; unquantized: its weight) and bias."""
    if producer.norm is not None:
        name = f"{prefix}{producer.norm}.weight"
        tensors[name] = folded_norm(tensors[name], scale, norm_offset)
        return
    base = f"{prefix}{producer.linear}."
    rows = slice(*producer.rows) if producer.rows else slice(None)
    for suffix, axis in (("scales", 1), ("weight", 0), ("bias", 0)):
        if base + suffix not in tensors:
            continue
        tensor = tensors[base + suffix].clone()
        view = tensor[:, rows] if axis == 1 else tensor[rows]
        shape = (1, -1) if axis == 1 else (-1,) + (1,) * (tensor.dim() - 1)
        view.copy_((view.float() / scale.to(tensor.device).reshape(shape)).to(tensor.dtype))
        tensors[base + suffix] = tensor


def _shared_across_heads(rms: Tensor, shared_by: int, head_dim: int) -> Tensor:
    """o_proj's columns are [value head][its query heads][head dim]: one mean over the query heads, repeated."""
    heads = rms.reshape(-1, shared_by, head_dim)
    return heads.mean(dim=1, keepdim=True).expand_as(heads).reshape(-1)


def _widths(config: dict) -> tuple[int, int, int]:
    """q's and each of k's and v's output width, and the MLP's intermediate width."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return heads * _head_dim(config), kv_heads * _head_dim(config), int(config["intermediate_size"])


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
