"""bitsandbytes 4-bit tensors (NF4 / FP4), plain and calibrated.

A Linear4bit weight [N, K] is flattened and cut into blocks of 64 consecutive
values. Each block stores one scale, its absmax, and each value becomes a 4-bit
index into a 16-entry code book (quant_map): the loader reads it back as
quant_map[code] * absmax. With double quantization the absmaxes themselves are
stored as 8-bit codes (blocks of 256) plus an offset, and the loader uses
dequantized absmax + offset: the *effective* scale.

Plain mode is bitsandbytes' own quantize_4bit, so the tensors are byte-identical
to what transformers saves.

Calibrated mode (our own idea) keeps bitsandbytes' scales and chooses the codes
with GPTQ instead of round-to-nearest:
1. Run quantize_4bit on the original weight. This fixes absmax (and, with double
   quantization, its nested 8-bit codes); only the 4-bit codes are redone.
2. Take the effective per-block scale, exactly as a loader computes it.
   With K % 64 == 0 a block is 64 consecutive input columns of one row, so
   column k of row n has the scale of block n * K / 64 + k // 64.
   (Otherwise blocks straddle rows and we fall back to plain, with a warning.)
3. Sweep the columns as GPTQ does (dead inputs zeroed, damped Hessian, upper
   Cholesky factor of H^-1, blocks of 128 columns with lazy updates; with
   act-order, the default, by decreasing Hessian diagonal, each column keeping
   its block's scale): round each column to the nearest code-book value
   quant_map * scale, and spread the rounding error over the columns not yet
   quantized, so that W @ X changes as little as possible.
4. Pack the codes as bitsandbytes does (two a byte, first value in the high
   nibble) in place of the data from step 1. The result is an ordinary
   bitsandbytes tensor set that any loader reads.
With H = I nothing is spread and every value is rounded to its nearest code
under the effective scale: without double quantization that is exactly plain.

With scale search (calibrated only), step 1 keeps its absmax only as a start: each
block's absmax becomes the best of absmax * CLIP_RATIOS, best by the block's
rounding error weighted by the Hessian diagonal of its columns (searched_absmax).
Any positive absmax is a valid bitsandbytes block scale. The chosen absmaxes are
then stored as bitsandbytes stores its own (double-quantized with their mean as
offset, when double quantization is on), and the sweep of step 3 runs on the
effective scales a loader computes from them.
"""

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowbit.errors import CorruptInputError, UsageError
from lowbit.quantize.sweep import all_finite, column_major, drop_dead_inputs, gptq_sweep, output_energy, relative_error_from_loss, working_hessian
from lowbit.quantize.grid import CLIP_RATIOS, SEARCH_CHUNK
from lowbit.quantize.hessian_factor import damped_inverse_factor_, permute_columns_, permute_symmetric_
from lowbit.quantize.settings import BNB_METHODS, QuantizeSettings, check_damp

if TYPE_CHECKING:
    import bitsandbytes.functional as bnb


def _bnb():
    """bitsandbytes, imported when first used: its import loads torch's compiler stack (about 4 s on the CPU),
    which a GPTQ run, a plan or an eval of a GPTQ checkpoint never needs."""
    import bitsandbytes.functional

    return bitsandbytes.functional


log = logging.getLogger("lowbit")

# vLLM dropped bitsandbytes (its RFC #39583, 2026): 0.32 has no such method and loads none of these files.
# tests/test_vllm.py checks this against the vLLM it installs.
VLLM_REFUSAL = "vLLM no longer loads bitsandbytes checkpoints (0.32 has no bitsandbytes method)"

BLOCKSIZE = 64  # values per absmax: what transformers always quantizes with
NESTED_BLOCKSIZE = 256  # double quantization: absmax bytes per float32 nested scale
STATE_KEY = "weight.quant_state.bitsandbytes__"  # + quant type: the serialized quant state of a weight
SWEEP_BLOCK = 128  # columns per lazy-update block of the GPTQ sweep
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BnbConfig:
    quant_type: str = "nf4"  # "nf4" | "fp4"
    double_quant: bool = True
    blocksize: int = BLOCKSIZE
    damp: float = 0.01  # only for calibrated: fraction of mean(diag(H)) added to the diagonal
    scale_search: bool = False  # only for calibrated: each block's absmax chosen by the diag(H)-weighted error
    act_order: bool = False  # only for calibrated: columns swept by decreasing Hessian diagonal, scales fixed

    @classmethod
    def from_settings(cls, settings: QuantizeSettings) -> "BnbConfig":
        return cls(quant_type=settings.method.value, double_quant=settings.double_quant, damp=settings.damp,
                   scale_search=settings.scale_search, act_order=settings.act_order)

    def __post_init__(self) -> None:
        if self.quant_type not in BNB_METHODS:
            raise UsageError(f"quant type must be nf4 or fp4, not {self.quant_type!r}")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise UsageError(f"block size must be one of {VALID_BLOCKSIZES}, not {self.blocksize}")
        check_damp(self.damp)


def quantize_bnb(weight: Tensor, config: BnbConfig, hessian: Tensor | None = None,
                 consume_hessian: bool = False) -> tuple[dict[str, Tensor], Tensor, dict]:
    """weight [N, K] -> (tensors, dequantized, stats).

    tensors: the Linear4bit state-dict entries, keys relative to the module ("weight",
      "weight.absmax", "weight.quant_map", ["weight.nested_absmax", "weight.nested_quant_map"],
      "weight.quant_state.bitsandbytes__<type>"), on the CPU, contiguous.
    dequantized: float32 [N, K] on weight's device, what a loader computes from those tensors.
    stats: {"calibrated": bool, "damp", "loss", "dead_inputs" (None when plain), "weight_mse"}.
    hessian None: plain bitsandbytes. hessian [K, K]: calibrated (see the module docstring); with
    consume_hessian the sweep works in its buffer (see gptq.gptq_quantize).
    Works on weight's device; the quant state records weight's dtype.
    """
    if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    if not all_finite(weight):
        raise CorruptInputError("weight contains NaN or inf")
    n_rows, n_cols = weight.shape
    weight = weight.detach().contiguous()
    packed, state = _bnb().quantize_4bit(
        weight, blocksize=config.blocksize, compress_statistics=config.double_quant, quant_type=config.quant_type
    )
    stats = {"calibrated": False, "damp": None, "loss": None, "dead_inputs": None}

    if hessian is not None and n_cols % config.blocksize != 0:
        log.warning(
            "%d input columns are not a multiple of the block size %d: plain %s instead of calibrated",
            n_cols, config.blocksize, config.quant_type,
        )
    elif hessian is not None:
        if hessian.shape != (n_cols, n_cols):
            raise ValueError(f"Hessian {tuple(hessian.shape)} does not match {n_cols} input columns")
        if config.scale_search:
            absmax = searched_absmax(weight, hessian.diagonal(), config.blocksize, state.code)
            state = state_with_absmax(state, absmax.reshape(-1), config.double_quant)
        scales = effective_absmax(state).reshape(n_rows, n_cols // config.blocksize)
        codes, sweep_stats = _calibrated_codes(weight, hessian, scales, state.code, config.damp, consume_hessian,
                                               config.act_order)
        packed = _pack_codes(codes)
        stats.update(calibrated=True, **sweep_stats)

    relative = {"weight": packed}
    relative.update({f"weight.{key}": value for key, value in state.as_dict(packed=True).items()})
    dequantized = dequantize_bnb(relative, (n_rows, n_cols))  # on weight's device: the layer runs with it next
    tensors = {key: value.cpu().contiguous() for key, value in relative.items()}
    stats["weight_mse"] = float((dequantized - weight.float()).square().mean())
    return tensors, dequantized, stats


def dequantize_bnb(tensors: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
    """float32 [N, K] from the Linear4bit state-dict entries (keys relative to the module), with bitsandbytes itself."""
    state_keys = [key for key in tensors if key.startswith(STATE_KEY)]
    if "weight" not in tensors or "weight.absmax" not in tensors or len(state_keys) != 1:
        raise CorruptInputError(f"incomplete bitsandbytes 4-bit tensors: {sorted(tensors)}")
    state_dict = {key.removeprefix("weight."): value for key, value in tensors.items() if key != "weight"}
    data = tensors["weight"]
    state = _bnb().QuantState.from_dict(state_dict, device=data.device)
    if tuple(state.shape) != tuple(shape):
        raise CorruptInputError(f"bitsandbytes quant state has shape {tuple(state.shape)}, expected {tuple(shape)}")
    return _bnb().dequantize_4bit(data, state).to(torch.float32)


def effective_absmax(state: "bnb.QuantState") -> Tensor:
    """float32 [n_blocks]: the scale of each block as dequantize_4bit computes it."""
    if not state.nested:
        return state.absmax.to(torch.float32)
    absmax = _bnb().dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.to(torch.float32)


def searched_absmax(weight: Tensor, importance: Tensor, blocksize: int, code_book: Tensor,
                    ratios: tuple[float, ...] = CLIP_RATIOS) -> Tensor:
    """Each block's absmax times the best of ratios: float32 [N, K // blocksize] for weight [N, K].

    Best: least sum over the block of importance[k] * (w - value)**2, value the loader's
    code_book[code] * absmax in weight's dtype, codes by round to nearest. K % blocksize == 0.
    """
    n_rows, n_cols = weight.shape
    W = weight.to(torch.float32)
    importance = importance.to(device=W.device, dtype=torch.float32)
    code_book = code_book.to(device=W.device, dtype=torch.float32)
    buckets = CodeBuckets.of(code_book)
    candidates = torch.tensor(ratios, dtype=torch.float32, device=W.device).unsqueeze(1)
    absmax = W.reshape(n_rows, n_cols // blocksize, blocksize).abs().amax(dim=2)
    best = torch.empty_like(absmax)
    rows_per_chunk = max(1, SEARCH_CHUNK // (len(ratios) * blocksize))
    for block in range(n_cols // blocksize):
        columns = slice(block * blocksize, (block + 1) * blocksize)
        for start in range(0, n_rows, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            w = W[rows, columns]
            scale = absmax[rows, block] * candidates  # [C, n]
            error = block_rounding_error(w, scale, importance[columns], buckets, weight.dtype)
            best[rows, block] = scale.gather(0, error.argmin(dim=0, keepdim=True))[0]  # first of equals: ratio 1
    return best


def block_rounding_error(w: Tensor, scale: Tensor, importance: Tensor, buckets: "CodeBuckets",
                         dtype: torch.dtype) -> Tensor:
    """sum_k importance[k] * (w[n, k] - value[n, k])**2 for round to nearest onto the code values * scale:
    w [n, B], scale [..., n] -> [..., n]."""
    s = scale.unsqueeze(-1)
    # the bucket's value directly (not code_book[order[bucket]]): one index, no int64 codes
    value = buckets.sorted_values[_nearest_buckets(w, s, buckets)].mul_(s).to(dtype).to(torch.float32)
    return value.sub_(w).square_() @ importance


def state_with_absmax(state: "bnb.QuantState", absmax: Tensor, double_quant: bool) -> "bnb.QuantState":
    """state with its block scales replaced by absmax [n_blocks], stored as quantize_4bit stores its own."""
    absmax = absmax.to(device=state.code.device, dtype=torch.float32)
    if not double_quant:
        return _bnb().QuantState(absmax=absmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                                 code=state.code, quant_type=state.quant_type)
    offset = absmax.mean()
    qabsmax, state2 = _bnb().quantize_blockwise(absmax - offset, blocksize=256)
    return _bnb().QuantState(absmax=qabsmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                             code=state.code, quant_type=state.quant_type, offset=offset, state2=state2)


def bnb_quantization_config(config: BnbConfig, skip_modules: list[str], compute_dtype: str = "bfloat16") -> dict:
    """The config.json "quantization_config" block, as transformers' BitsAndBytesConfig.to_dict() writes it.

    It has no block size: transformers always quantizes with 64, and a loader reads
    the block size of each tensor from its quant state anyway.
    """
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": config.quant_type,
        "bnb_4bit_use_double_quant": config.double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def expected_tensors(n: int, k: int, quant_type: str, double_quant: bool) -> dict[str, tuple[torch.dtype, tuple | None]]:
    """(dtype, shape) of a Linear [N, K]: two codes a byte, one absmax per BLOCKSIZE values; shape None:
    any 1-D length (the serialized quant state)."""
    blocks = math.ceil(n * k / BLOCKSIZE)
    tensors: dict[str, tuple[torch.dtype, tuple | None]] = {
        "weight": (torch.uint8, ((n * k + 1) // 2, 1)),
        "weight.absmax": (torch.uint8 if double_quant else torch.float32, (blocks,)),
        "weight.quant_map": (torch.float32, (16,)),
        f"{STATE_KEY}{quant_type}": (torch.uint8, None),
    }
    if double_quant:
        tensors["weight.nested_absmax"] = (torch.float32, (math.ceil(blocks / NESTED_BLOCKSIZE),))
        tensors["weight.nested_quant_map"] = (torch.float32, (256,))
    return tensors


QUANT_STATE_BYTES = 200  # the serialized quant state JSON: 80 bytes, 170 with double quantization; counted high


def linear_bytes(n: int, k: int, double_quant: bool = True) -> int:
    """Bytes on disk of one Linear [N, K] (without bias): codes, quant_map, the quant state's JSON, and
    per block a float32 absmax, or with double quantization a uint8 one plus a float32 per NESTED_BLOCKSIZE
    blocks and the nested code book."""
    blocks = math.ceil(n * k / BLOCKSIZE)
    absmax = blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 256 * 4 if double_quant else blocks * 4
    return (n * k + 1) // 2 + absmax + 16 * 4 + QUANT_STATE_BYTES


def _calibrated_codes(weight: Tensor, hessian: Tensor, scales: Tensor, code_book: Tensor, damp: float,
                      consume_hessian: bool = False, act_order: bool = False) -> tuple[Tensor, dict]:
    """GPTQ sweep onto the code book: weight [N, K], scales [N, K // blocksize] -> (codes uint8 [N, K], stats).

    A column's value is what the loader will compute: code_book[code] * scale in float32,
    cast to the weight's dtype. That value is what the error is measured against.
    With act_order the columns are swept by decreasing Hessian diagonal, the most active inputs first, while
    every column keeps its own block's scale (GPTQ's act-order with static groups: the scales are fixed
    before the sweep, so the file does not change form).
    """
    n_rows, n_cols = weight.shape
    blocksize = n_cols // scales.shape[1]
    W = column_major([weight])  # a float32 copy the sweep overwrites
    H = working_hessian(hessian, W.device, consume_hessian)
    if not all_finite(H):
        raise CorruptInputError("Hessian contains NaN or inf")
    dead = drop_dead_inputs(W, H)
    signal, mean_diag = output_energy(W, H), float(H.diagonal().mean())  # before H becomes the factor
    column_of = list(range(n_cols))  # the weight column at each step of the sweep
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        permute_symmetric_(H, perm)
        permute_columns_(W, perm)
        column_of = perm.tolist()
    damp = damped_inverse_factor_(H, damp)
    Hinv = H  # its upper triangle is the factor the sweep reads

    code_book = code_book.to(device=W.device, dtype=torch.float32)
    buckets = CodeBuckets.of(code_book)
    codes = torch.zeros(n_rows, n_cols, dtype=torch.uint8, device=W.device)

    def quantize_column(step: int, w: Tensor) -> Tensor:
        col = column_of[step]
        scale = scales[:, col // blocksize]
        bucket = _nearest_buckets(w, scale, buckets)
        codes[:, col] = buckets.order[bucket].to(torch.uint8)
        return (buckets.sorted_values[bucket] * scale).to(weight.dtype).to(torch.float32)

    loss = gptq_sweep(W, Hinv, quantize_column, SWEEP_BLOCK)

    def dequantize_rows(rows: slice) -> Tensor:
        row_scales = scales[rows].repeat_interleave(blocksize, dim=1)
        return (code_book[codes[rows].long()] * row_scales).to(weight.dtype).to(torch.float32)

    error = relative_error_from_loss(loss, damp * mean_diag, weight, dequantize_rows, dead, signal)
    return codes, {"damp": damp, "loss": loss, "dead_inputs": int(dead.sum()), "error": error,
                   "output_energy": signal / 2}  # H = 2/n sum x x^T


BUCKET_BINS = 4096  # CodeBuckets' table: equal bins of [-1, 1], each narrower than any two code values' gap
# no bound this close to a bin's edge: x * BINS / 2 + BINS / 2 rounds by at most 6e-8 of x in float32, so a
# bin found off by one lies only that close to an edge
BUCKET_MARGIN = 1e-6


@dataclass(frozen=True)
class CodeBuckets:
    """A code book sorted, the midpoints between its values (bounds: the same construction as bitsandbytes'
    quantize_4bit, so that ties and FP4's two zeros resolve to the same codes) and a table that finds the
    bucket of x, the number of bounds below it, in two lookups: for each of BUCKET_BINS equal bins of
    [-1, 1], how many bounds lie below the bin (below) and the bound inside it (inside, +inf where none).
    torch.bucketize gives the same, 2.5x slower on the CPU, where NF4's scale search spent most of its
    time in it; it stays where the table cannot be exact (a bound at a bin's edge: FP4's zero)."""

    order: Tensor  # the code index of each sorted position
    sorted_values: Tensor
    bounds: Tensor
    below: Tensor | None
    inside: Tensor | None

    @classmethod
    def of(cls, code_book: Tensor) -> "CodeBuckets":
        order = torch.argsort(code_book)
        sorted_values = code_book[order]
        bounds = (sorted_values[:-1] + sorted_values[1:]) / 2
        edges = torch.linspace(-1, 1, BUCKET_BINS + 1, dtype=torch.float64)
        counts = torch.bucketize(edges, bounds.double().cpu())  # bounds < each edge
        near_edge = (bounds.double().cpu()[:, None] - edges).abs().min() < BUCKET_MARGIN
        if near_edge or (counts[1:] - counts[:-1]).max() > 1:
            return cls(order, sorted_values, bounds, None, None)
        inside = torch.full((BUCKET_BINS,), math.inf)
        holds = (counts[1:] > counts[:-1]).nonzero().flatten()
        inside[holds] = bounds.float().cpu()[counts[holds]]
        return cls(order, sorted_values, bounds, counts[:-1].to(bounds.device, torch.int32),
                   inside.to(bounds.device))

    def index(self, x: Tensor) -> Tensor:
        """torch.bucketize(x, bounds, out_int32=True) for float32 x in [-1, 1], or NaN (0 * 1 / a subnormal scale),
        which bucketize puts past the last bound, as 1 is."""
        if self.below is None:
            return torch.bucketize(x, self.bounds, out_int32=True)
        x = torch.nan_to_num(x, nan=1.0)
        half = BUCKET_BINS / 2
        bins = torch.mul(x, half).add_(half).to(torch.int32).clamp_(0, BUCKET_BINS - 1)
        found = self.below[bins]
        return found.add_(x > self.inside[bins])


def _nearest_buckets(w: Tensor, scale: Tensor, buckets: CodeBuckets) -> Tensor:
    """Position among the sorted code values of the one nearest to w / scale (int32); its code is
    buckets.order[position], its value buckets.sorted_values[position].

    Written as bitsandbytes writes it (w * (1 / scale), clamp, bucketize), so that with
    bitsandbytes' own absmax the codes are bit-identical to quantize_4bit. A zero scale
    (a block of zeros) maps everything to the zero code.
    """
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return buckets.index(torch.clamp_(w * inverse, -1, 1))


def _pack_codes(codes: Tensor) -> Tensor:
    """uint8 [N, K] codes -> bitsandbytes' layout uint8 [N * K // 2, 1]: two a byte, first in the high nibble."""
    flat = codes.reshape(-1)
    return ((flat[::2] << 4) | flat[1::2]).unsqueeze(1)
