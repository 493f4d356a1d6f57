"""The GPTQ solver (Frantar et al., 2022): one weight matrix and its Hessian in, codes and scales out.

Columns of W [N, K] are quantized one at a time, left to right. After each column,
its rounding error is spread over the columns not yet quantized, weighted by the
inverse Hessian, so that W @ X changes as little as possible (H = 2/n X X^T).
Errors are applied inside a block of columns at once and to the rest of the
matrix in one matmul per block ("lazy batch updates"). That sweep, shared with calibrated
NF4, is quantize/sweep.py; this module is the uniform grid's side of it.
"""

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import CorruptInputError, UsageError
from lowbit.quantize.grid import grid_params, grid_params_per_group, quantize_to_codes, searched_grid_params
from lowbit.quantize.hessian_factor import damped_inverse_factor_, permute_columns_, permute_symmetric_
from lowbit.quantize.settings import QuantizeSettings, check_bits, check_damp, check_group_size
from lowbit.quantize.sweep import (ROWS_AT_ONCE, all_finite, column_major, drop_dead_inputs, gptq_sweep, output_energy,
                                  relative_error_from_loss, working_hessian)

log = logging.getLogger("lowbit")

SEARCH_WEIGHTS = ("sweep", "diag")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4  # 2, 3, 4 or 8
    group_size: int = 128  # -1: one group over all input columns
    sym: bool = True
    act_order: bool = False  # quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # groups of original columns, params from the original weights
    scale_search: bool = False  # each group's clipping chosen by its rounding error, weighted per column
    # The search's column weights. "diag": diag(H), the mean squared activation. "sweep": what the sweep's
    # objective charges for a rounding error in each column, 1 / U_kk^2 (the part of that input no later
    # column can compensate): 10 % less held-out layer error on Gemma-3, yet a worse whole-model
    # perplexity (BENCHMARKS.md, "GPTQ's levers"), so not the default.
    search_weights: str = "diag"
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    block_size: int = 128

    @classmethod
    def from_settings(cls, settings: QuantizeSettings) -> "GPTQConfig":
        return cls(bits=settings.bits, group_size=settings.group_size, sym=settings.sym, act_order=settings.act_order,
                   static_groups=settings.static_groups, scale_search=settings.scale_search, damp=settings.damp)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        check_damp(self.damp)
        if self.block_size < 1:
            raise UsageError(f"block size must be at least 1, not {self.block_size}")
        if self.search_weights not in SEARCH_WEIGHTS:
            raise UsageError(f"scale search weights must be one of {', '.join(SEARCH_WEIGHTS)}, not {self.search_weights}")


@dataclass
class QuantizedWeight:
    codes: Tensor  # uint8 [N, K], original column order, values 0..2**bits-1
    scales: Tensor  # float32 [n_groups, N], exactly representable in float16
    zeros: Tensor  # int32 [n_groups, N], true zero points (not minus one)
    g_idx: Tensor  # int32 [K], group of each input column
    bits: int

    def dequantize(self) -> Tensor:
        """float32 [N, K]: scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n]), built a few rows at a time."""
        out = torch.empty(self.codes.shape, dtype=torch.float32, device=self.codes.device)
        for start in range(0, out.shape[0], ROWS_AT_ONCE):
            rows = slice(start, start + ROWS_AT_ONCE)
            out[rows] = self.dequantize_rows(rows)
        return out

    def rows(self, rows: slice) -> "QuantizedWeight":
        """The weight of these output rows alone (one Linear of a stacked solve), in tensors of its own."""
        return QuantizedWeight(codes=self.codes[rows].clone(), scales=self.scales[:, rows].clone(),
                               zeros=self.zeros[:, rows].clone(), g_idx=self.g_idx.clone(), bits=self.bits)

    def dequantize_rows(self, rows: slice) -> Tensor:
        group = self.g_idx.long()
        scales, zeros = self.scales[:, rows], self.zeros[:, rows]
        return scales[group].T * (self.codes[rows].to(torch.float32) - zeros[group].T.to(torch.float32))


@dataclass
class GPTQStats:
    damp: float  # damping fraction finally used (after any Cholesky retries)
    loss: float  # 1/2 sum over rows of (W-Q) H_damped (W-Q)^T = sum err^2 / (2 Hinv_ii^2), as the reference
    dead_inputs: int  # input columns with diag(H) == 0 (never active in calibration)
    error: float  # relative output error ||(W - Q) X||^2 / ||W X||^2 on the undamped Hessian
    output_energy: float = 0.0  # mean ||W x||^2 over the calibration tokens: turns `error` into an absolute one


def gptq_quantize(weight: Tensor, hessian: Tensor, config: GPTQConfig,
                  consume_hessian: bool = False) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize weight [N, K] given the Hessian [K, K] of its inputs. Works in float32 on weight's device.

    consume_hessian: work in the Hessian's own buffer (when it is float32 on that device) and leave
    garbage there; the solver then holds no second K x K matrix. Otherwise a copy is worked on.
    """
    (result,) = gptq_quantize_each(weight, hessian, [config], consume_hessian)
    return result


def gptq_quantize_each(weight: Tensor, hessian: Tensor, configs: list[GPTQConfig],
                       consume_hessian: bool = False) -> list[tuple[QuantizedWeight, GPTQStats]]:
    """One sweep of GPTQ per config (bits, group size) against ONE factor of the Hessian.

    Act-order's permutation depends on diag(H) alone and the damped inverse factor on H alone, so
    configs that share act_order and damp share both: the K x K factorisation is paid once, each
    extra config costs one sweep. This is how a size budget scores its candidates (quantize/mixed.py).
    """
    return [each[0] for each in gptq_quantize_stacked([weight], hessian, configs, consume_hessian)]


def gptq_quantize_stacked(weights: list[Tensor], hessian: Tensor, configs: list[GPTQConfig],
                          consume_hessian: bool = False) -> list[list[tuple[QuantizedWeight, GPTQStats]]]:
    """gptq_quantize_each for Linears [N_i, K] that share their input, so its Hessian (q/k/v): their rows
    stacked [sum N_i, K] in one sweep per config, results[config][linear]. GPTQ never mixes rows (every
    update acts row by row), so each Linear gets the codes it would get alone, bit for bit, for one
    factorisation and one column loop in all.
    """
    first = configs[0]
    if any(c.act_order != first.act_order or c.damp != first.damp for c in configs):
        raise ValueError("configs swept against one factor must share act_order and damp")
    n_cols = weights[0].shape[1]
    parts, start = [], 0
    for weight in weights:
        parts.append(slice(start, start + weight.shape[0]))
        start += weight.shape[0]
    W = column_major(weights)  # the sweep works in place, so in a float32 copy, never in the caller's weights
    H = working_hessian(hessian, W.device, consume_hessian)
    if not (all_finite(W) and all_finite(H)):
        raise CorruptInputError("weight or Hessian contains NaN or inf")

    dead = drop_dead_inputs(W, H)
    searched = any(c.scale_search for c in configs)
    importance = H.diagonal().clone() if searched else None  # mean squared activation of each input
    perm = torch.argsort(H.diagonal(), descending=True) if first.act_order else torch.arange(n_cols, device=W.device)
    signals = [output_energy(W[rows], H) for rows in parts]  # before H becomes the factor
    mean_diag = float(H.diagonal().mean())
    if first.act_order:
        permute_symmetric_(H, perm)
    damp = damped_inverse_factor_(H, first.damp)
    sweep_weights = None  # see GPTQConfig.search_weights: 1 / U_kk^2, back in the original column order
    if any(c.scale_search and c.search_weights == "sweep" for c in configs):
        sweep_weights = H.diagonal().square().reciprocal()[torch.argsort(perm)]

    # configs whose groups fit the same sweep blocks are swept together, their rows stacked (see _sweep_stacked)
    batches: dict[int, list[int]] = {}
    for index, config in enumerate(configs):
        batches.setdefault(_block_size(config.block_size, _group_size(config, n_cols), n_cols), []).append(index)
    swept: dict[int, tuple[QuantizedWeight, Tensor]] = {}
    for number, (block, indices) in enumerate(batches.items()):
        in_place = number == len(batches) - 1  # W may be overwritten by the last sweep
        batch = [configs[i] for i in indices]
        importances = [(sweep_weights if c.search_weights == "sweep" else importance) if c.scale_search else None
                       for c in batch]
        swept.update(zip(indices, _sweep_stacked(W, H, perm, importances, batch, block, in_place)))
    results = []
    for index in range(len(configs)):
        quantized, row_loss = swept[index]
        each = []
        for rows, weight, signal in zip(parts, weights, signals):
            part = quantized if len(parts) == 1 else quantized.rows(rows)
            loss = float(row_loss[rows].sum())
            error = relative_error_from_loss(loss, damp * mean_diag, weight, part.dequantize_rows, dead, signal)
            each.append((part, GPTQStats(damp=damp, loss=loss, dead_inputs=int(dead.sum()), error=error,
                                         output_energy=signal / 2)))  # H = 2/n sum x x^T
        results.append(each)
    return results


@dataclass
class _Grid:
    """One config's group params while a sweep runs over its rows W of the (stacked) weights.

    The column loop reads each group's params through per-group row views (lists): a Python index, no
    tensor op. Codes are not kept in the loop: a swept column keeps the value it was rounded from (later
    updates reach only the columns after it), so they are taken from W in bulk once the sweep is done.
    """

    config: GPTQConfig
    group_size: int
    scales: Tensor  # [n_groups, N]
    zeros: Tensor
    lowest: Tensor  # -zero: the least code minus zero, per group and row
    highest: Tensor  # maxq - zero
    sweep_group: list[int]  # the group of each sweep column
    sweep_importance: Tensor | None
    W: Tensor | None = None  # its rows of the swept matrix, in sweep order

    def __post_init__(self) -> None:
        self.scale_rows, self.lowest_rows, self.highest_rows = (list(t.unbind(0)) for t in
                                                                (self.scales, self.lowest, self.highest))

    def set_params(self, g: int, scale: Tensor, zero: Tensor) -> None:
        self.scales[g], self.zeros[g] = scale, zero
        torch.neg(zero, out=self.lowest[g])
        torch.sub(2**self.config.bits - 1, zero, out=self.highest[g])


def _new_grid(W0: Tensor, perm: Tensor, importance: Tensor | None, config: GPTQConfig) -> _Grid:
    n_rows, n_cols = W0.shape
    group_size = _group_size(config, n_cols)
    n_groups = n_cols // group_size
    if config.static_groups:  # groups of original columns, params from the original weights
        scales, zeros = grid_params_per_group(W0, group_size, config.bits, config.sym, importance)
        sweep_group = (perm // group_size).tolist()
    else:  # groups of consecutive columns in the sweep, params filled in as each group starts
        scales = torch.zeros(n_groups, n_rows, device=W0.device)
        zeros = torch.zeros(n_groups, n_rows, device=W0.device)
        sweep_group = [col // group_size for col in range(n_cols)]
    return _Grid(config, group_size, scales, zeros, -zeros, (2**config.bits - 1) - zeros, sweep_group,
                 None if importance is None else importance[perm])


def _quantize_column(grid: _Grid, col: int, w: Tensor) -> Tensor:
    """Round column col (sweep order) of the grid's rows; returns its dequantized value, scale * (code - zero).

    clamp(round(w / scale), -zero, maxq - zero) is code - zero exactly (small integers in float32).
    """
    g = grid.sweep_group[col]
    if not grid.config.static_groups and col % grid.group_size == 0:  # params from the weights updated so far
        w_group = grid.W[:, col : col + grid.group_size]
        if grid.sweep_importance is None:
            grid.set_params(g, *grid_params(w_group, grid.config.bits, grid.config.sym))
        else:
            grid.set_params(g, *searched_grid_params(w_group, grid.sweep_importance[col : col + grid.group_size],
                                                     grid.config.bits, grid.config.sym))
    scale = grid.scale_rows[g]
    return torch.div(w, scale).round_().clamp_(grid.lowest_rows[g], grid.highest_rows[g]).mul_(scale)


def _swept_codes(grid: _Grid) -> Tensor:
    """uint8 codes [N, K] in sweep order, from the swept W: column by column what _quantize_column rounded."""
    codes = torch.empty(grid.W.shape, dtype=torch.uint8, device=grid.W.device)
    group = torch.tensor(grid.sweep_group, device=grid.W.device)
    for start in range(0, codes.shape[1], grid.config.block_size):
        cols = slice(start, start + grid.config.block_size)
        scale, zero = grid.scales[group[cols]].T, grid.zeros[group[cols]].T
        codes[:, cols] = torch.div(grid.W[:, cols], scale).round_().add_(zero).clamp_(0, 2**grid.config.bits - 1)
    return codes


def _quantized(grid: _Grid, perm: Tensor) -> QuantizedWeight:
    codes = _swept_codes(grid)
    n_cols = codes.shape[1]
    inverse_perm = torch.argsort(perm)
    # The group of original column k: k // G with static groups, else its position in the sweep // G.
    g_idx = torch.arange(n_cols, device=codes.device) if grid.config.static_groups else inverse_perm
    return QuantizedWeight(
        codes=codes[:, inverse_perm].contiguous(),
        scales=grid.scales,
        zeros=grid.zeros.round().to(torch.int32),
        g_idx=(g_idx // grid.group_size).to(torch.int32),
        bits=grid.config.bits,
    )


def _sweep_stacked(W0: Tensor, Hinv: Tensor, perm: Tensor, importances: list[Tensor | None],
                   configs: list[GPTQConfig], block_size: int, in_place: bool) -> list[tuple[QuantizedWeight, Tensor]]:
    """GPTQ's sweep of W0 [N, K] (original column order, dead inputs zeroed) for each config at once, against
    the factor Hinv of the permuted Hessian: each config gets its own copy of the rows, stacked [C*N, K].

    The sweep's updates act row by row, so stacked rows never mix; one pass over the K columns then costs
    about what one config's costs wherever the sweep is bound by its many small steps (a GPU, one CPU
    thread), for C x N x K float32 more memory. in_place: one config may overwrite W0.
    """
    n_rows = W0.shape[0]
    grids = [_new_grid(W0, perm, importance, config) for importance, config in zip(importances, configs)]
    act_order = configs[0].act_order
    if len(configs) == 1 and in_place:
        W = W0
        if act_order:
            permute_columns_(W, perm)
    else:
        W = column_major([W0[:, perm] if act_order else W0] * len(configs))
    for c, grid in enumerate(grids):
        grid.W = W[c * n_rows : (c + 1) * n_rows]

    def quantize_column(col: int, w: Tensor) -> Tensor:
        if len(grids) == 1:
            return _quantize_column(grids[0], col, w)
        return torch.cat([_quantize_column(g, col, w[c * n_rows : (c + 1) * n_rows]) for c, g in enumerate(grids)])

    row_loss = torch.zeros(W.shape[0], device=W.device)
    gptq_sweep(W, Hinv, quantize_column, block_size, row_loss)
    return [(_quantized(grid, perm), row_loss[c * n_rows : (c + 1) * n_rows]) for c, grid in enumerate(grids)]


def rtn_quantize(weight: Tensor, config: GPTQConfig, importance: Tensor | None = None) -> QuantizedWeight:
    """Round to nearest on the same grid and groups as GPTQ (act_order and static_groups are ignored).

    With config.scale_search, each group's clipping minimises its rounding error weighted by
    importance [K] (the Hessian diagonal), which is then required.
    """
    n_rows, n_cols = weight.shape
    group_size = _group_size(config, n_cols)
    W = weight.detach().to(torch.float32)
    if config.scale_search and importance is None:
        raise UsageError("RTN with scale search weighs each input by its calibration activations: it needs a Hessian")
    scales, zeros = grid_params_per_group(W, group_size, config.bits, config.sym,
                                          importance if config.scale_search else None)
    codes = torch.empty(n_rows, n_cols, dtype=torch.uint8, device=W.device)
    for g in range(n_cols // group_size):
        cols = slice(g * group_size, (g + 1) * group_size)
        codes[:, cols] = quantize_to_codes(W[:, cols], scales[g], zeros[g], config.bits).to(torch.uint8)
    g_idx = torch.arange(n_cols, device=W.device) // group_size
    return QuantizedWeight(
        codes=codes,
        scales=scales,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=config.bits,
    )


def _group_size(config: GPTQConfig, n_cols: int) -> int:
    group_size = n_cols if config.group_size == -1 else config.group_size
    if n_cols % group_size:
        raise ValueError(f"{n_cols} input columns are not a multiple of the group size {group_size}")
    return group_size


def _block_size(block_size: int, group_size: int, n_cols: int) -> int:
    """A block size under which every group lies inside one block or starts at a block start.

    Group params are computed when a group starts, from the weights updated so far.
    Columns past the current block have not yet received this block's updates, so a
    group may only reach past the block if it starts at the block's first column.
    """
    if group_size >= n_cols:
        return block_size
    if group_size <= block_size:
        return block_size // group_size * group_size
    return math.gcd(group_size, block_size)

