"""The uniform b-bit grid: one scale and one zero point per output row of a group.

A weight w is stored as an integer code q in 0..2**bits-1 and read back as
scale * (q - zero). Scales are stored as float16 on disk, so every scale made
here is rounded to float16 first: the grid the solver aims at is then exactly
the grid a loader reconstructs.

Scale search (searched_grid_params): instead of the range of a row, try the range
shrunk by each of CLIP_RATIOS and keep, per row, the candidate whose rounding error
weighted by the importance of each column is least (the Hessian diagonal, the mean
squared activation of that input; see gptq.py for the other weights it can take).
Each error counts as |error|**SEARCH_NORM. Ratio 1.0 is a candidate, and it is exactly
grid_params, so the search never does worse on the error it minimises.
"""

import torch
from torch import Tensor

# Smallest positive and largest finite float16: a scale outside would become 0 or inf on disk.
FLOAT16_TINY = 2.0**-24
FLOAT16_MAX = 65504.0

# Candidate clipping ratios, 1.0 first (ties keep the full range). Steps of 2.5 % move the
# outermost 4-bit level by a third of a level or less; below 0.5 a ratio clips half the range,
# and peers find nothing there (AWQ searches down to 0.5 as well). 21 candidates.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))
# candidates x rows x columns evaluated at once: bounds the search's temporaries; past a few MiB they leave
# the CPU's cache (a 2048 x 640 Linear's search: 2**24 values 2.1x the time of 2**20; the five temporaries
# it once made at 2**24, 13x)
SEARCH_CHUNK = 2**20
# The search's error is sum_k importance[k] * |w - q|**SEARCH_NORM. A cube charges one clipped outlier more
# than many small rounding errors, so it clips less than the square. Against the square it took Gemma-3-270M
# 3g64 from 43.36 to 40.03 and 4g128 from 27.30 to 27.24, SmolLM2 3g64 from 48.58 to 48.36, and lost on
# SmolLM2 4g64 (33.57 against 33.29), whose weights sit on a 4-bit grid; 4 did better at 3 bits alone
# (BENCHMARKS.md, "search-norm"). llm-compressor's imatrix_mse observer uses 3 as well.
SEARCH_NORM = 3.0


def grid_params(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of each row of w [N, G] -> (scale [N], zero [N]), both float32.

    sym:  zero = 2**(bits-1), scale = 2 * max|w| / maxq.
    asym: the row's range stretched to contain 0, scale = (max - min) / maxq,
          zero = round(-min / scale) clamped to [1, maxq] (GPTQ v1 stores zero - 1,
          so zero 0 cannot be written).
    Rows of zeros get scale 1 so that nothing divides by zero.
    """
    scale, zero = _candidate_params(w.to(torch.float32), bits, sym, torch.ones(1, device=w.device))
    return scale[0], zero[0]


def searched_grid_params(w: Tensor, importance: Tensor, bits: int, sym: bool,
                         ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[Tensor, Tensor]:
    """grid_params with the range of each row of w [N, G] shrunk by the best of ratios.

    Best: least sum over columns of importance[k] * |w[n, k] - dequantized[n, k]|**SEARCH_NORM,
    importance [G] >= 0. All rows and candidates at once, in chunks of rows.
    """
    w = w.to(torch.float32).contiguous()  # the sweep's weights are column-major; the search runs along rows
    importance = importance.to(device=w.device, dtype=torch.float32)
    candidates = torch.tensor(ratios, dtype=torch.float32, device=w.device)
    rows_per_chunk = max(1, SEARCH_CHUNK // max(1, len(ratios) * w.shape[1]))
    scales, zeros = [], []
    for start in range(0, w.shape[0], rows_per_chunk):
        rows = w[start : start + rows_per_chunk]
        scale, zero = _candidate_params(rows, bits, sym, candidates)  # [C, n] each
        error = weighted_rounding_error(rows, scale, zero, bits, importance)  # [C, n]
        best = error.argmin(dim=0, keepdim=True)  # the first of equal errors: the widest range
        scales.append(scale.gather(0, best)[0])
        zeros.append(zero.gather(0, best)[0])
    return torch.cat(scales), torch.cat(zeros)


def weighted_rounding_error(w: Tensor, scale: Tensor, zero: Tensor, bits: int, importance: Tensor) -> Tensor:
    """sum_k importance[k] * |w[n, k] - RTN(w)[n, k]|**SEARCH_NORM for each grid: w [N, G], scale and zero
    [..., N] -> [..., N]."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    # one temporary, worked in place: codes, then their value, then the error (the search's time is this)
    error = torch.div(w, s).round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s).sub_(w)
    return error.abs_().pow_(SEARCH_NORM) @ importance


def _candidate_params(w: Tensor, bits: int, sym: bool, ratios: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero of each row of w [N, G] for its range shrunk by each ratio: ([C, N], [C, N]).

    sym:  zero = 2**(bits-1), scale = 2 * max|w| * ratio / maxq.
    asym: [min, max] (stretched to contain 0) times ratio, scale = its width / maxq,
          zero = round(-min / scale) clamped to [1, maxq].
    """
    maxq = 2**bits - 1
    ratios = ratios.unsqueeze(1)
    if sym:
        scale = _stored_scale(2 * w.abs().amax(dim=1) * ratios / maxq)
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        low = w.amin(dim=1).clamp(max=0) * ratios
        high = w.amax(dim=1).clamp(min=0) * ratios
        scale = _stored_scale((high - low) / maxq)
        zero = torch.round(-low / scale).clamp(1, maxq)
    return scale, zero


def grid_params_per_group(w: Tensor, group_size: int, bits: int, sym: bool,
                          importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """grid_params for every group of group_size consecutive columns of w [N, K]; with
    importance [K], searched_grid_params weighted by it.

    Returns (scale, zero), each float32 [K // group_size, N]. K must be a multiple of group_size.
    """
    n_rows, n_cols = w.shape
    n_groups = n_cols // group_size
    if importance is None:
        # [N, K] -> [n_groups * N, G]: row g * N + n is output row n over group g.
        rows = w.reshape(n_rows, n_groups, group_size).transpose(0, 1).reshape(n_groups * n_rows, group_size)
        scale, zero = grid_params(rows, bits, sym)
        return scale.reshape(n_groups, n_rows), zero.reshape(n_groups, n_rows)
    params = [searched_grid_params(w[:, g * group_size : (g + 1) * group_size],
                                   importance[g * group_size : (g + 1) * group_size], bits, sym)
              for g in range(n_groups)]
    return torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params])


def quantize_to_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes of w [N, M] on the grid of each row: clamp(round(w / scale) + zero, 0, maxq), int32."""
    maxq = 2**bits - 1
    codes = torch.round(w.to(torch.float32) / scale.unsqueeze(1)) + zero.unsqueeze(1)
    return codes.clamp(0, maxq).to(torch.int32)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Values of codes [N, M] on the grid of each row: scale * (codes - zero), float32."""
    return scale.unsqueeze(1) * (codes.to(torch.float32) - zero.unsqueeze(1))


def _stored_scale(scale: Tensor) -> Tensor:
    """Scale 0 (a row of zeros) becomes 1; every scale is rounded to float16, as it will be stored."""
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(FLOAT16_TINY, FLOAT16_MAX).to(torch.float16).to(torch.float32)
