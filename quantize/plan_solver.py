"""The temporaries of one Linear's solve, pack and checks, for the memory model of quantize/plan.py: plain
products of the Linear's shape, each read off the code it describes."""

from __future__ import annotations

from lowbit.quantize.arch import Linear
from lowbit.quantize.grid import CLIP_RATIOS, SEARCH_CHUNK
from lowbit.quantize.nf4 import BLOCKSIZE as BNB_BLOCKSIZE

FLOAT32 = 4
PACK_CHUNK_VALUES = 2**22  # quantize/pack.py packs this many codes at a time (int64 temporaries)


def gptq_solver_bytes(linear: Linear, group_size: int = 128, sweeps: int = 1, budget: bool = False,
                      weight_in_float32: bool = True) -> int:
    """The solver's own peak for one Linear (quantize/gptq.py, then pack and dequantize), beside its Hessian:
    the Hessian is damped, factored and inverted in its own buffer (quantize/hessian_factor.py), so no
    K x K term: the factorisation holds a few [K, 256] panels. While solving: W in float32 (permuted in
    place with act-order), the codes (NK bytes) and one block's errors, or the panels. Once W is gone: the
    codes and packing, or the codes and dequantize (the float32 result and one chunk of rows' temporaries).
    sweeps > 1 (a size budget's other formats, gptq._sweep_stacked): W's rows stacked per format, codes and block
    errors per format. budget: then the per-token errors (token_error_bytes), beside every format's codes, the
    base's dequantized weight and one candidate's (none where the base is the only format swept).
    """
    nk = linear.weights * FLOAT32
    solving = nk + (sweeps * nk if sweeps > 1 else 0) + sweeps * linear.weights + max(
        2 * sweeps * linear.out_features * 128 * FLOAT32, _factor_panel_bytes(linear), scale_search_bytes(linear, group_size))
    packing = linear.weights + pack_bytes(linear)
    dequantize = linear.weights + nk + _row_chunk_bytes(linear)
    tokens = sweeps * linear.weights + min(sweeps, 2) * nk + token_error_bytes(linear, weight_in_float32) if budget else 0
    return max(solving, packing, dequantize, tokens)


def nf4_solver_bytes(linear: Linear, budget: bool = False, weight_in_float32: bool = True) -> int:
    """quantize/nf4.py's calibrated sweep for one Linear, beside its Hessian: bitsandbytes' packed codes,
    W in float32, the codes and the factorisation's panels (the Hessian is factored in its own buffer).
    budget: then the dequantized weight and its per-token error (token_error_bytes)."""
    nk = linear.weights * FLOAT32
    sweep = linear.weights // 2 + nk + linear.weights + max(_factor_panel_bytes(linear), _row_chunk_bytes(linear),
                                                            scale_search_bytes(linear, BNB_BLOCKSIZE, temporaries=4))
    tokens = linear.weights // 2 + nk + token_error_bytes(linear, weight_in_float32) if budget else 0
    return max(sweep, tokens)


def token_error_bytes(linear: Linear, weight_in_float32: bool) -> int:
    """solve.relative_token_error beside the dequantized weights: W - Q in float32 (and a float32 copy of W,
    where W is not), one chunk of 512 input rows moved to W's device, their products [512, N] and squares."""
    nk = linear.weights * FLOAT32
    return (1 if weight_in_float32 else 2) * nk + 512 * (linear.in_features + 2 * linear.out_features) * FLOAT32


def scale_search_bytes(linear: Linear, group_size: int, temporaries: int = 1) -> int:
    """grid.searched_grid_params: one float32 [candidates, rows, group] temporary, worked in place, its rows
    chunked to at most SEARCH_CHUNK values; nf4.searched_absmax about four (its int32 buckets, which
    indexing widens to int64, and the values looked up)."""
    group = linear.in_features if group_size == -1 else group_size
    return temporaries * FLOAT32 * min(len(CLIP_RATIOS) * linear.out_features * group, SEARCH_CHUNK)


def _factor_panel_bytes(linear: Linear) -> int:
    """hessian_factor's temporaries: a [K, 256] panel, its solved copy and a [256, K] product."""
    return 3 * linear.in_features * 256 * FLOAT32


def _row_chunk_bytes(linear: Linear) -> int:
    """Dequantizing or measuring the error 512 rows at a time: about three [512, K] float32 temporaries."""
    return 3 * min(512, linear.out_features) * linear.in_features * FLOAT32


def nf4_check_bytes(linear: Linear, on_gpu: bool) -> int:
    """quantize_bnb's error check, in host memory: the dequantized weight, the error and its square,
    and on a GPU a host copy of the weight."""
    return (4 if on_gpu else 3) * linear.weights * FLOAT32


def error_check_bytes(linear: Linear) -> int:
    """driver.relative_output_error without a Hessian: a float32 weight, the full difference (sliced to
    512 rows after it is made) and the square of the slice."""
    return 2 * linear.weights * FLOAT32 + linear.weights * FLOAT32 * min(1.0, 512 / linear.out_features)


def pack_bytes(linear: Linear) -> int:
    """pack_rows' temporaries for one chunk of codes: two int64 copies and the int64 words."""
    chunk = min(linear.weights, PACK_CHUNK_VALUES)
    return 2 * 8 * chunk + chunk
