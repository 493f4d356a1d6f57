"""Predict the peak memory of `lowbit quantize` and `lowbit eval` from a model's config.json alone.

The engine runs in phases (embed the windows; per decoder layer: a Hessian
pass per group, a solve per Linear, a pass to move the activations on, a save;
then the writer). For each phase we add up the bytes that are resident then,
on the device and in host memory, reading off the code what each step holds;
the predicted peak is the largest phase. Every figure is a plain product of
config sizes, so `lowbit plan` answers before anything is downloaded, and the
driver uses the same figures to decide whether activations go to host memory.

Sizes: h hidden, I intermediate, V vocabulary, K/N a Linear's in/out features,
n x S calibration windows, c bytes of the compute dtype (4 on the CPU, 2 on a
GPU), s bytes of the checkpoint's dtype. GPU figures are allocated tensor
bytes (what torch.cuda.max_memory_allocated reports); fit.gpu_needed adds the
CUDA context and the caching allocator's slack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.quantize.arch import Linear, ModelShape
from lowbit.quantize.fp_targets import fp_inputs_bytes
from lowbit.quantize.sweep import ROWS_AT_ONCE
from lowbit.quantize.nf4 import linear_bytes as bnb_linear_bytes
from lowbit.quantize.mixed import kept_candidate_bytes, swept_formats
from lowbit.quantize.pack import linear_bytes as gptq_linear_bytes
from lowbit.quantize.plan_solver import (FLOAT32, error_check_bytes, gptq_solver_bytes, nf4_check_bytes,
                                          nf4_solver_bytes, pack_bytes)
from lowbit.quantize.settings import GPTQ_FORMAT_METHODS, Method, QuantizeSettings, uses_activations
from lowbit.quantize.solve import TOKEN_SAMPLE_ROWS, solved_as

GiB = 2**30
HOST_BASELINE = int(0.56 * GiB)  # the `lowbit quantize` process itself: its peak on a hidden-64 model (CPU torch 2.13)
HOST_CUDA_RUNTIME = 1 * GiB  # CUDA libraries mapped into the process (an estimate, not measured here)
CUDA_CONTEXT = int(0.5 * GiB)  # on the card, outside torch's allocated bytes
ALLOCATOR_SLACK = 0.10  # reserved over allocated in torch's caching allocator


@dataclass(frozen=True)
class PlanSettings:
    """QUANTIZE's settings (what the output depends on) and the run's: windows, device, evaluation."""

    quantize: QuantizeSettings = QuantizeSettings()
    calibrated: bool = True  # nf4/fp4 with calibration data; gptq always, rtn never
    nsamples: int = 128
    seqlen: int = 2048
    device: str = "cuda"  # cuda | cpu
    compute_bytes: int | None = None  # None: as lowbit picks (float32 on the CPU, 16-bit on a GPU)
    offload: bool = False  # calibration activations in host memory
    eval_windows: int = 40
    eval_seqlen: int = 2048
    eval_chunk: int = 512
    eval_offload: bool = False
    eval_base: bool = True  # score against the base model: two sets of final hidden states

    @property
    def method(self) -> Method:
        return self.quantize.method

    @property
    def bits(self) -> int:
        return self.quantize.bits

    @property
    def group_size(self) -> int:
        return self.quantize.group_size

    @property
    def c(self) -> int:
        if self.compute_bytes is not None:
            return self.compute_bytes
        return FLOAT32 if self.device == "cpu" else 2

    @property
    def uses_activations(self) -> bool:
        return uses_activations(self.method, self.calibrated)

    @property
    def fp_targets(self) -> bool:
        return self.uses_activations and bool(self.quantize.resolved(self.calibrated).fp_targets)


@dataclass
class Phase:
    """What is resident during one step of the engine: {what: bytes} on the device and in host memory."""

    name: str
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Peak:
    bytes: int
    phase: str
    parts: dict[str, int]


# ---- output ----

def linear_output_bytes(linear: Linear, s: PlanSettings) -> int:
    """Bytes on disk of one quantized Linear (without bias), as the driver writes it."""
    n, k = linear.out_features, linear.in_features
    if s.method in GPTQ_FORMAT_METHODS:
        return gptq_linear_bytes(n, k, s.bits, s.group_size)
    return bnb_linear_bytes(n, k, s.quantize.double_quant)


# ---- what one step holds ----

def forward_bytes(shape: ModelShape, seqlen: int, c: int, upto: tuple[Linear, ...] | None = None) -> int:
    """Intermediates of one window through one decoder layer, sdpa attention (no [S, S] matrix).

    upto: stop after this group (run_layer_until), else the whole layer. The groups are, in order,
    the q/k/v projections, o_proj, gate/up, down. RMSNorm works in float32; attention holds rotary
    copies of q and k, k and v repeated to every head, and its output; the MLP four [S, I] tensors with a fused gate_up
    (the fused output, the activation, the product), three without.
    """
    h, width = shape.hidden, seqlen * c
    norm = width * h + seqlen * h * FLOAT32 * 2
    q = shape.groups[1][0].in_features  # o_proj reads the heads' outputs
    qkv = sum(linear.out_features for linear in shape.groups[0])
    # rotary q and k, k and v repeated to every head, the output and its contiguous copy
    attention = width * (4 * q + (qkv - q) + 2 * h)
    qkv *= width
    fused = len(shape.groups[2]) == 1
    mlp = width * ((4 if fused else 3) * shape.intermediate + 2 * h)
    stage = len(shape.groups) - 1 if upto is None else shape.groups.index(upto)
    return [norm + qkv, attention, norm + width * 2 * shape.intermediate, max(attention, mlp)][stage]


DOWN_INPUTS_KEPT_UP_TO = 2**30  # bytes: above this, down_proj's inputs are recomputed (gate/up run once more)


def down_inputs_kept(nsamples: int, seqlen: int, intermediate: int, c: int) -> int:
    """Bytes of down_proj's inputs true-sequential keeps for every window (0: too large, not kept)."""
    size = nsamples * seqlen * intermediate * c
    return size if size <= DOWN_INPUTS_KEPT_UP_TO else 0


def _hook_bytes(linear: Linear, seqlen: int, c: int) -> int:
    """HessianAccumulator.add for one window: its input in float32 (a copy unless it is); x^T x adds in place."""
    return 0 if c == FLOAT32 else seqlen * linear.in_features * FLOAT32


def _packed_layer_bytes(shape: ModelShape, s: PlanSettings) -> int:
    return sum(linear_output_bytes(linear, s) for linear in shape.linears)


# ---- quantization ----

def quantize_phases(shape: ModelShape, s: PlanSettings) -> list[Phase]:
    """The engine's steps for one decoder layer (every layer holds the same), plus the start and the end.

    What a step still holds from the one before matters as much as its own temporaries: the previous
    layer's quantized tensors stay referenced while the next layer is quantized. (The driver drops each
    group's Hessians and each Linear's float32 copies before the next one starts.)
    """
    if not s.uses_activations:
        return _weights_only_phases(shape, s)
    c, src, h = s.c, shape.source_bytes, shape.hidden
    on_gpu = s.device != "cpu"
    budget = s.quantize.target_bpw is not None  # a size budget: per-token errors on sample rows in every solve
    acts = s.nsamples * s.seqlen * h * c
    acts_device = {} if s.offload else {"calibration activations": acts}
    acts_host = {"calibration activations (offloaded)": acts} if s.offload else {}
    window = {"one window copied to the device": s.seqlen * h * c} if s.offload else {}
    host = {"decoder layer as read": shape.layer_params * src, **acts_host}
    if s.fp_targets:  # fp_targets.FullPrecisionStream: two buffers where the activations are saved in a thread
        host["unquantized hidden states"] = (2 if s.offload or not on_gpu else 1) * acts
    fp_inputs = {"unquantized inputs kept": sum(fp_inputs_bytes(s.nsamples, s.seqlen, g[0].in_features, c)
                                                for g in shape.groups)} if s.fp_targets else {}
    shares_source = not on_gpu and c == src  # load_weights keeps the tensors as read
    layer = {} if shares_source else {"decoder layer (compute dtype)": shape.layer_params * c}
    packed = _packed_layer_bytes(shape, s)
    quantized = ({"quantized Linears (this layer and the last)": 2 * packed} if s.method == "gptq" else {})
    kept_candidates = sum(kept_candidate_bytes(s.quantize, l.out_features, l.in_features) for l in shape.linears)
    candidates = {"candidate formats' tensors (this layer)": kept_candidates} if kept_candidates else {}  # a budget's
    if s.method != "gptq":
        host["quantized Linears (this layer and the last)"] = 2 * packed  # quantize_bnb returns host tensors
    embedding_check = {"its NaN check": finite_check_bytes(shape.embedding_params, src)}
    phases = [Phase("read the embedding", host={"embedding as read": shape.embedding_params * src, **embedding_check}),
              _read_layer_phase(shape, host),
              Phase("embed the calibration windows",
                    device={**({} if shares_source else {"embedding (compute dtype)": shape.embedding_params * c}),
                            **acts_device, "one window's embeddings": 2 * s.seqlen * h * c},
                    host={"embedding as read": shape.embedding_params * src, **acts_host})]
    if s.fp_targets:
        host_fp = {**host, **fp_inputs}
        phases.append(Phase("run the layer unquantized", host=host_fp,
                            device={**layer, **acts_device, **quantized,
                                    "one window's intermediates": forward_bytes(shape, s.seqlen, c)}))
        host = host_fp  # from layer to layer: FullPrecisionStream writes the next layer's inputs over them
    batches = [[g] for g in shape.groups] if s.quantize.true_sequential else [list(shape.groups)]
    # true sequential keeps o_proj's input of every window from the attention pass to the residual pass,
    # and down_proj's from its Hessian pass to the layer's outputs where that is small
    o_inputs = s.nsamples * s.seqlen * shape.groups[1][0].in_features * c
    down_inputs = down_inputs_kept(s.nsamples, s.seqlen, shape.groups[-1][0].in_features, c)
    kept_by_step = {1: {"o_proj inputs kept": o_inputs}, 2: {"o_proj inputs kept": o_inputs},
                    3: {"down_proj inputs kept": down_inputs} if down_inputs else {}}
    sample_rows = min(s.nsamples * s.seqlen, TOKEN_SAMPLE_ROWS) if budget else 0
    for index, batch in enumerate(batches):
        hessians = {"Hessians": sum(g[0].in_features ** 2 * FLOAT32 for g in batch)}
        fitted = [g for g in batch if s.fp_targets and fp_inputs_bytes(s.nsamples, s.seqlen, g[0].in_features, c)]
        if fitted:  # HessianAccumulator's cross sums, and one window's unquantized inputs copied for them
            hessians["cross sums"] = sum(g[0].in_features ** 2 * FLOAT32 for g in fitted)
        # a size budget's per-token errors: each group's first input rows, kept in host memory with its Hessian
        sample = {"input rows kept for per-token errors": sum(sample_rows * g[0].in_features * FLOAT32 for g in batch)}
        host_here = {**host, **(sample if sample_rows else {})}
        kept_here = kept_by_step.get(index, {}) if s.quantize.true_sequential else {}
        kept, kept_host = ({}, kept_here) if on_gpu else (kept_here, {})  # always in host memory
        phases.append(Phase(f"Hessian pass up to {batch[-1][-1].name}",
                            device={**layer, **acts_device, **window, **quantized, **hessians, **kept,
                                    "one window's intermediates": forward_bytes(shape, s.seqlen, c, batch[-1]),
                                    "Hessian update": max(_hook_bytes(g[0], s.seqlen, c) for g in batch)
                                    + max((s.seqlen * g[0].in_features * FLOAT32 for g in fitted), default=0)},
                            host={**host_here, **kept_host}))
        for group in batch:
            if group in fitted:  # fp_targets.fit_to_fp_targets: a damped factor of H, then W* Linear by Linear
                widest = max(group, key=lambda linear: linear.weights)
                phases.append(Phase(f"fit {group[0].name} towards the unquantized outputs", host=host_here,
                                    device={**layer, **acts_device, **quantized, **candidates, **hessians,
                                            **(kept if index in (1, 3) else {}),
                                            "factor of the damped Hessian": group[0].in_features ** 2 * FLOAT32,
                                            f"W* of {widest.name}": widest.weights * c,
                                            "its rows' float32 temporaries": 4 * ROWS_AT_ONCE * widest.in_features
                                            * FLOAT32}))
                hessians = {k: v for k, v in hessians.items() if k != "cross sums"}  # spent by the fit
            solves = solved_as(group, shape.linears, s.quantize)
            for linear in solves:
                # the GPTQ solver's float32 W is among its temporaries; quantize_bnb's error check makes another
                weight_copy = ({} if c == FLOAT32 or s.method == "gptq" else
                               {"weight in float32": linear.weights * FLOAT32})
                if on_gpu and c != src:  # driver._solve_linear casts the weight back to the source dtype
                    weight_copy["weight in the source dtype"] = linear.weights * src
                # the solver consumes the Hessian: every solve of the group but the last gets a copy
                hessian_copy = ({} if linear is solves[-1] else
                                {"copy of the group's Hessian": linear.in_features ** 2 * FLOAT32})
                resident = {**layer, **acts_device, **quantized, **candidates, **hessians, **weight_copy,
                            **hessian_copy, **(kept if index in (1, 3) else {})}
                sweeps = len(swept_formats(s.quantize, linear.out_features, linear.in_features))
                solver = (gptq_solver_bytes(linear, s.group_size, sweeps, budget, c == FLOAT32) if s.method == "gptq"
                          else nf4_solver_bytes(linear, budget, c == FLOAT32))
                phases.append(Phase(f"solve {linear.name}",
                                    device={**resident, f"solver temporaries of {linear.name}": solver},
                                    host={**host_here, **(kept_host if index in (1, 3) else {})}))
                if s.method != "gptq":
                    phases.append(Phase(f"check {linear.name}", device={**resident, "packed codes": linear.weights // 2},
                                        host={**host, f"error check of {linear.name}": nf4_check_bytes(linear, on_gpu)}))
    kept, kept_host = ({}, kept_here) if on_gpu else (kept_here, {})  # the last step's: down_proj's inputs
    phases.append(Phase("run the layer to move activations on",
                        device={**layer, **acts_device, **window, **quantized, **candidates, **kept,
                                "one window's intermediates": forward_bytes(shape, s.seqlen, c)},
                        host={**host, **kept_host}))
    copy = {"activations copied to the host": acts} if on_gpu and not s.offload else {}  # _save_layer
    phases.append(Phase("save the layer and its output activations", device={**layer, **acts_device, **quantized,
                        **candidates}, host={**host, **copy, "quantized Linears copied to the host": packed + kept_candidates}))
    phases.append(_writer_phase(shape, s))
    return phases


def _weights_only_phases(shape: ModelShape, s: PlanSettings) -> list[Phase]:
    """RTN and plain NF4/FP4 read one tensor at a time and quantize it on the CPU: no device memory.

    RTN: the float32 weight, then the largest of: the group statistics (a regrouped copy and its
    absolute values), the codes while packing, dequantize (17 bytes a weight). NF4: the float32
    weight, the packed codes, the dequantized weight, the error and its square. Then the error check.
    """
    src = shape.source_bytes
    done = {"quantized Linears of the layer": _packed_layer_bytes(shape, s)}
    phases = []
    previous: Linear | None = None
    for linear in shape.linears:
        nk = linear.weights
        as_read = {"weight as read": nk * src, **({} if src == FLOAT32 else {"weight in float32": nk * FLOAT32})}
        if s.method == "rtn":
            solver = max(2 * nk * FLOAT32, nk + pack_bytes(linear), 17 * nk)
        else:
            solver = nk // 2 + 3 * nk * FLOAT32
        # the previous Linear's result (its float32 dequantized weight) lives until this one's is returned
        leftover = {"previous Linear's dequantized weight": previous.weights * FLOAT32} if previous else {}
        phases.append(Phase(f"quantize {linear.name}",
                            host={**as_read, **done, **leftover, f"temporaries of {linear.name}": solver}))
        phases.append(Phase(f"check {linear.name}", host={**as_read, **done, "dequantized weight": nk * FLOAT32,
                                                          f"error check of {linear.name}": int(error_check_bytes(linear))}))
        previous = linear
    phases.append(_writer_phase(shape, s))
    return phases


def finite_check_bytes(values: int, itemsize: int) -> int:
    """checkpoint.check_all_finite on a tensor as it is read (sweep.all_finite): a float32 copy of a
    float8 tensor, nothing for wider types."""
    return values * 4 if itemsize == 1 else 0


def _writer_phase(shape: ModelShape, s: PlanSettings) -> Phase:
    """One tensor at a time; the source's embedding and head are checked for NaN as they stream."""
    embedding = shape.embedding_params
    largest = max([embedding * shape.source_bytes] + [linear_output_bytes(l, s) for l in shape.linears])
    return Phase("write the output shards", host={"largest tensor being written": largest,
                                                  "its NaN check": finite_check_bytes(embedding, shape.source_bytes)})


def _read_layer_phase(shape: ModelShape, host: dict[str, int]) -> Phase:
    """Reading the next layer while the last one's tensors are still referenced, each checked for NaN."""
    largest = max(linear.weights for linear in shape.linears)
    return Phase("read the next layer", host={**host, "next decoder layer as read": shape.layer_params * shape.source_bytes,
                                              "its NaN check": finite_check_bytes(largest, shape.source_bytes)})


# ---- evaluation ----

def eval_phases(shape: ModelShape, s: PlanSettings) -> list[Phase]:
    """evals/evaluate.py: each model's windows layer by layer to the final norm, then the head in chunks.

    Shown for the quantized model, the second to run: the base's final hidden states wait meanwhile.
    """
    c, src, h = s.c, shape.source_bytes, shape.hidden
    sets = 2 if s.eval_base else 1
    hidden_set = s.eval_windows * s.eval_seqlen * h * c
    hidden_device = {} if s.eval_offload else {"final hidden states": sets * hidden_set}
    hidden_host = {"final hidden states (offloaded)": sets * hidden_set} if s.eval_offload else {}
    window = {"one window copied to the device": s.eval_seqlen * h * c} if s.eval_offload else {}
    on_cpu = s.device == "cpu"
    largest = max(shape.linears, key=lambda linear: linear.weights)
    # the loader dequantizes every Linear of the layer to float32, one at a time (unpack, then dequantize)
    dense_layer = shape.layer_params * FLOAT32
    dequantize = 17 * largest.weights + pack_bytes(largest)
    layer_device = {} if on_cpu and c == FLOAT32 else {"decoder layer (compute dtype)": shape.layer_params * c}
    head = shape.embedding_params * FLOAT32
    chunk = 5 * s.eval_chunk * shape.vocab * FLOAT32 + s.eval_chunk * h * FLOAT32  # log-probs of both models, KLD terms
    if not s.eval_base:
        chunk = 2 * s.eval_chunk * shape.vocab * FLOAT32 + s.eval_chunk * h * FLOAT32
    return [
        Phase("read and dequantize a layer",
              device={**hidden_device}, host={**hidden_host, "layer as read": _packed_layer_bytes(shape, s),
                                              "dense float32 layer": dense_layer,
                                              f"dequantizing {largest.name}": dequantize}),
        Phase("run a layer",
              device={**hidden_device, **layer_device, **window,
                      "one window's intermediates": forward_bytes(shape, s.eval_seqlen, c)},
              host={**hidden_host, **({"dense float32 layer": dense_layer} if on_cpu and c == FLOAT32 else {})}),
        Phase("score in chunks of positions",
              device={**hidden_device, "lm_head in float32": head, "one chunk's log-probabilities": chunk},
              host={**hidden_host, "lm_head as read (both models)": 2 * shape.embedding_params * src}),
    ]


# ---- peaks and verdicts ----
def peaks(phases: list[Phase], s: PlanSettings) -> tuple[Peak, Peak]:
    """(device peak, host peak); on the CPU the device is host memory, and the device peak is empty."""
    baseline = HOST_BASELINE + (HOST_CUDA_RUNTIME if s.device != "cpu" else 0)

    def host_parts(phase: Phase) -> dict[str, int]:
        parts = {"process (Python, torch, transformers)": baseline, **phase.host}
        if s.device == "cpu":
            for k, v in phase.device.items():
                parts[k] = parts.get(k, 0) + v
        return parts

    def peak_of(parts_of) -> Peak:
        best = max(phases, key=lambda p: sum(parts_of(p).values()))
        parts = {k: v for k, v in parts_of(best).items() if v}
        return Peak(sum(parts.values()), best.name, parts)

    device = Peak(0, "none", {}) if s.device == "cpu" else peak_of(lambda p: p.device)
    return device, peak_of(host_parts)
