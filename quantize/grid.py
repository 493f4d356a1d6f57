"""The uniform b-bit grid: one scale and one zero point per output row of a group.

A weight w is stored as an integer code q in 0..2**bits-1 and read back as
scale * (q - zero). Scales are stored as float16 on disk, so every scale made
here is rounded to float16 first: the grid the solver aims at is then exactly
the grid a loader reconstructs.
"""

import torch
from torch import Tensor

# Smallest positive and largest finite float16: a scale outside would become 0 or inf on disk.
FLOAT16_TINY = 2.0**-24
FLOAT16_MAX = 65504.0


def grid_params(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of each row of w [N, G] -> (scale [N], zero [N]), both float32.

    sym:  zero = 2**(bits-1), scale = 2 * max|w| / maxq.
    asym: the row's range stretched to contain 0, scale = (max - min) / maxq,
          zero = round(-min / scale) clamped to [1, maxq] (GPTQ v1 stores zero - 1,
          so zero 0 cannot be written).
    Rows of zeros get scale 1 so that nothing divides by zero.
    """
    maxq = 2**bits - 1
    w = w.to(torch.float32)
    if sym:
        scale = _stored_scale(2 * w.abs().amax(dim=1) / maxq)
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        low = w.amin(dim=1).clamp(max=0)
        high = w.amax(dim=1).clamp(min=0)
        scale = _stored_scale((high - low) / maxq)
        zero = torch.round(-low / scale).clamp(1, maxq)
    return scale, zero


def grid_params_per_group(w: Tensor, group_size: int, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """grid_params for every group of group_size consecutive columns of w [N, K].

    Returns (scale, zero), each float32 [K // group_size, N]. K must be a multiple of group_size.
    """
    n_rows, n_cols = w.shape
    n_groups = n_cols // group_size
    # [N, K] -> [n_groups * N, G]: row g * N + n is output row n over group g.
    rows = w.reshape(n_rows, n_groups, group_size).transpose(0, 1).reshape(n_groups * n_rows, group_size)
    scale, zero = grid_params(rows, bits, sym)
    return scale.reshape(n_groups, n_rows), zero.reshape(n_groups, n_rows)


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
