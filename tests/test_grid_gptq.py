import logging

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quantize.gptq import GPTQConfig, gptq_quantize, rtn_quantize
from lowbit.quantize.grid import dequantize_codes, grid_params, quantize_to_codes


def correlated_problem(n_rows=32, n_cols=128, n_samples=512, seed=0):
    """Weights, inputs X [K, n] with correlated channels of very different sizes, and H = 2/n X X^T."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_cols, n_cols, generator=gen)
    channel_size = torch.logspace(-1, 1, n_cols)[torch.randperm(n_cols, generator=gen)]
    X = channel_size.unsqueeze(1) * (mixing @ torch.randn(n_cols, n_samples, generator=gen))
    W = torch.randn(n_rows, n_cols, generator=gen)
    return W, X, 2 / n_samples * X @ X.T


def output_error(W, q, X):
    return torch.linalg.norm(W @ X - q.dequantize() @ X).item()


# --- the grid -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_grid_covers_the_row_and_rounds_to_nearest(bits, sym):
    w = torch.randn(16, 64) + (0.0 if sym else 0.5)
    scale, zero = grid_params(w, bits, sym)
    assert torch.equal(scale.half().float(), scale)  # the grid loaders will see
    assert torch.equal(zero, zero.round())
    codes = quantize_to_codes(w, scale, zero, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    error = (dequantize_codes(codes, scale, zero) - w).abs()
    # At most half a step, plus what rounding the scale to float16 (relative 2**-11) moves the extremes.
    slack = w.abs().amax(dim=1) * 2**-10
    assert (error <= (scale * 0.5 + slack).unsqueeze(1)).all()


def test_grid_params_follow_the_reference_formulas():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.25, 0.5, 1.5]])
    scale, zero = grid_params(w, 4, sym=True)
    assert torch.equal(zero, torch.tensor([8.0, 8.0]))
    assert torch.equal(scale, torch.tensor([4 / 15, 3 / 15]).half().float())
    scale, zero = grid_params(w, 4, sym=False)
    assert torch.equal(scale, torch.tensor([3 / 15, 1.5 / 15]).half().float())
    assert zero[0] == round(1 / scale[0].item())
    assert zero[1] == 1  # min is 0 after stretching: zero 0 is clamped to 1 (v1 cannot store it)


def test_all_zero_rows_get_scale_one_and_stay_zero():
    w = torch.zeros(3, 8)
    for sym in (True, False):
        scale, zero = grid_params(w, 4, sym)
        assert torch.equal(scale, torch.ones(3))
        assert torch.equal(dequantize_codes(quantize_to_codes(w, scale, zero, 4), scale, zero), w)


# --- GPTQ -------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group_size", [(4, 16), (3, 32), (4, -1), (2, 64), (8, 128)])
def test_identity_hessian_gives_round_to_nearest(sym, bits, group_size):
    W = torch.randn(24, 256)
    config = GPTQConfig(bits=bits, group_size=group_size, sym=sym)
    q, stats = gptq_quantize(W, torch.eye(256), config)
    rtn = rtn_quantize(W, config)
    assert torch.equal(q.codes, rtn.codes)
    assert torch.equal(q.scales, rtn.scales)
    assert torch.equal(q.zeros, rtn.zeros)
    assert torch.equal(q.g_idx, rtn.g_idx)
    assert stats.damp == 0.01 and stats.dead_inputs == 0


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, group_size):
    W, X, H = correlated_problem()
    rtn_error = output_error(W, rtn_quantize(W, GPTQConfig(bits=bits, group_size=group_size)), X)
    for act_order in (False, True):
        config = GPTQConfig(bits=bits, group_size=group_size, act_order=act_order)
        q, _ = gptq_quantize(W, H, config)
        assert output_error(W, q, X) < 0.9 * rtn_error
        assert q.codes.dtype == torch.uint8 and q.codes.shape == W.shape
        assert int(q.codes.max()) <= 2**bits - 1


def test_loss_is_the_objective_on_the_damped_hessian():
    W, X, H = correlated_problem(n_rows=8, n_cols=64)
    q, stats = gptq_quantize(W, H, GPTQConfig(bits=3, group_size=16, act_order=True))
    damped = H + stats.damp * H.diagonal().mean() * torch.eye(64)
    delta = (W - q.dequantize()).double()
    expected = 0.5 * torch.einsum("nk,kl,nl->", delta, damped.double(), delta).item()
    assert stats.loss == pytest.approx(expected, rel=1e-3)


def test_act_order_groups_follow_decreasing_hessian_diagonal():
    W, X, H = correlated_problem(n_rows=8, n_cols=64)
    q, _ = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=16, act_order=True))
    assert torch.equal(torch.bincount(q.g_idx), torch.full((4,), 16))
    diag = H.diagonal()
    for g in range(3):
        assert diag[q.g_idx == g].min() >= diag[q.g_idx == g + 1].max()


def test_static_groups_keep_groups_of_consecutive_columns_and_original_scales():
    W, X, H = correlated_problem(n_rows=8, n_cols=64)
    config = GPTQConfig(bits=4, group_size=16, act_order=True, static_groups=True)
    q, _ = gptq_quantize(W, H, config)
    assert torch.equal(q.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    rtn = rtn_quantize(W, config)
    assert torch.equal(q.scales, rtn.scales) and torch.equal(q.zeros, rtn.zeros)
    assert output_error(W, q, X) < output_error(W, rtn, X)


def test_group_larger_than_block_uses_the_updated_weights():
    # Group 96 with blocks of 64: groups start at block starts (block size becomes 32).
    W, X, H = correlated_problem(n_rows=8, n_cols=192)
    small_blocks, _ = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=96, block_size=64))
    one_block, _ = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=96, block_size=192))
    torch.testing.assert_close(small_blocks.scales, one_block.scales, rtol=1e-2, atol=0)
    assert (small_blocks.codes != one_block.codes).float().mean() < 0.01


def test_dead_inputs_get_zero_weight():
    W, X, _ = correlated_problem(n_rows=8, n_cols=32)
    dead = torch.tensor([3, 17, 30])
    X[dead] = 0
    H = 2 / X.shape[1] * X @ X.T
    for act_order in (False, True):
        q, stats = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=16, act_order=act_order))
        assert stats.dead_inputs == 3
        assert torch.equal(q.dequantize()[:, dead], torch.zeros(8, 3))
        assert torch.isfinite(q.dequantize()).all()


def test_indefinite_hessian_is_retried_with_more_damping(caplog):
    H = torch.eye(8)
    H[0, 1] = H[1, 0] = 1.5  # eigenvalue -0.5: needs damp 1.0 (x mean diag 1) to become positive definite
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        q, stats = gptq_quantize(torch.randn(4, 8), H, GPTQConfig(group_size=-1, damp=0.01))
    assert stats.damp == pytest.approx(1.0)
    assert len([r for r in caplog.records if "damp" in r.getMessage()]) == 2
    assert torch.isfinite(q.dequantize()).all()


def test_rank_deficient_hessian_without_damping_does_not_crash():
    x = torch.randn(16, 1)
    q, stats = gptq_quantize(torch.randn(4, 16), x @ x.T, GPTQConfig(group_size=8, damp=0.0))
    assert stats.damp > 0
    assert torch.isfinite(q.dequantize()).all()


def test_hopeless_hessian_raises_a_lowbit_error():
    H = torch.eye(4)
    H[0, 1] = H[1, 0] = 1e9
    with pytest.raises(LowbitError):
        gptq_quantize(torch.randn(2, 4), H, GPTQConfig(group_size=-1))
    with pytest.raises(LowbitError):
        gptq_quantize(torch.full((2, 4), float("nan")), torch.eye(4), GPTQConfig(group_size=-1))


def test_columns_not_a_multiple_of_group_size_raise_value_error():
    with pytest.raises(ValueError):
        gptq_quantize(torch.randn(4, 100), torch.eye(100), GPTQConfig(group_size=32))
    with pytest.raises(ValueError):
        rtn_quantize(torch.randn(4, 100), GPTQConfig(group_size=32))


def test_bad_settings_are_usage_errors():
    for settings in ({"bits": 5}, {"group_size": 0}, {"damp": -1.0}):
        with pytest.raises(LowbitError):
            GPTQConfig(**settings)


def test_dequantize_uses_g_idx():
    W, X, H = correlated_problem(n_rows=4, n_cols=32)
    q, _ = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=8, act_order=True))
    n, k = 2, 5
    g = int(q.g_idx[k])
    expected = q.scales[g, n] * (float(q.codes[n, k]) - float(q.zeros[g, n]))
    assert q.dequantize()[n, k] == expected


# --- the column loop's cost -------------------------------------------------------------

# Ops that only make a view of a tensor: no kernel runs for them on a GPU.
VIEW_OPS = {"select", "slice", "as_strided", "view", "t", "transpose", "permute", "unsqueeze", "expand", "alias",
            "detach", "diagonal", "_local_scalar_dense"}


def test_the_column_loop_launches_seven_kernels_a_column():
    """On a GPU each operation of the column loop is a kernel launch, and Phi-4's down_proj has 17920
    columns: the loop must stay at its seven (divide, round, clamp, dequantize, the error in two, one
    rank-1 update), whatever the matrix size. The codes are taken from the swept weights afterwards."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.compute = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in VIEW_OPS:
                self.compute += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for n_cols in (256, 512):  # the per-column part is the difference: block and setup work cancel out
        W, _, H = correlated_problem(n_rows=16, n_cols=n_cols, n_samples=1024)
        counter = CountOps()
        with counter:
            gptq_quantize(W, H, GPTQConfig(bits=4, group_size=128))
        counts[n_cols] = counter.compute
    per_column = (counts[512] - counts[256]) / 256
    assert per_column <= 7.5, per_column  # 19.3 before 2026-12-01, 10.3 before 2026-12-02


# --- the Hessian ---------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [64, 200, 576, 1000])
def test_hessian_from_its_upper_bands_is_the_full_mean(columns):
    from lowbit.quantize.solve import HESSIAN_BAND, HessianAccumulator, hessian_bands

    bands = hessian_bands(columns)
    assert bands[0][0] == 0 and bands[-1][1] == columns
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    assert all(end - start <= HESSIAN_BAND for start, end in bands)
    gen = torch.Generator().manual_seed(columns)
    batches = [torch.randn(rows, columns, generator=gen) * torch.logspace(-1, 1, columns) for rows in (100, 37, 256)]
    accumulator = HessianAccumulator(columns, torch.device("cpu"))
    for x in batches:
        accumulator.add(x)
    hessian = accumulator.mean()
    x = torch.cat(batches).double()
    expected = 2 / x.shape[0] * x.T @ x
    assert torch.equal(hessian, hessian.T)  # mirrored exactly
    torch.testing.assert_close(hessian.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert accumulator.sum is None  # the mean took the sum's buffer


@pytest.mark.parametrize("config", [
    GPTQConfig(bits=4, group_size=32),
    GPTQConfig(bits=3, group_size=32, act_order=True, static_groups=True, scale_search=True),
    GPTQConfig(bits=4, group_size=-1, sym=False, act_order=True, scale_search=True),
], ids=["plain", "default", "asym-act-order"])
def test_linears_swept_stacked_get_the_codes_of_their_own_solves(config):
    from lowbit.quantize.gptq import gptq_quantize_stacked

    W, _, H = correlated_problem(n_rows=40, n_cols=128)
    weights = [W[:24], W[24:32], W[32:]]
    (stacked,) = gptq_quantize_stacked(weights, H, [config])
    for weight, (q, stats) in zip(weights, stacked):
        alone, alone_stats = gptq_quantize(weight, H, config)
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(q, field), getattr(alone, field)), field
        assert stats.loss == pytest.approx(alone_stats.loss, rel=1e-6)
        assert stats.error == pytest.approx(alone_stats.error, rel=1e-6)
        assert stats.output_energy == pytest.approx(alone_stats.output_energy, rel=1e-6)
