"""Scale search: the Hessian-weighted clipping choice on the uniform grid and on NF4 blocks."""

from __future__ import annotations

import bitsandbytes.functional as bnb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quantize.gptq import GPTQConfig, gptq_quantize, rtn_quantize
from lowbit.quantize.grid import CLIP_RATIOS, SEARCH_NORM, grid_params, searched_grid_params, weighted_rounding_error
from lowbit.quantize.nf4 import BnbConfig, effective_absmax, quantize_bnb, searched_absmax


def random_rows(seed: int, rows: int, columns: int, outliers: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-ish tailed weights and a positive importance per column, some columns far more important."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=gen)
    if outliers:
        w = w * torch.rand(rows, columns, generator=gen).pow(4).mul(6).add(0.5)
    importance = torch.rand(columns, generator=gen).pow(3) * 10
    return w.to(torch.bfloat16).float(), importance


def brute_force_uniform(w, importance, bits, sym, norm=SEARCH_NORM, ratio_of_best=False):
    """The least weighted error sum_k importance[k] * |w - q|**norm over CLIP_RATIOS, each candidate built by
    hand (not by the code under test); with ratio_of_best, the ratio that gives it, per row."""
    maxq = 2**bits - 1
    best = torch.full((w.shape[0],), float("inf"))
    best_ratio = torch.ones(w.shape[0])
    for ratio in CLIP_RATIOS:
        if sym:
            scale = (2 * w.abs().amax(1) * ratio / maxq)
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            low, high = w.amin(1).clamp(max=0) * ratio, w.amax(1).clamp(min=0) * ratio
            scale = (high - low) / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float16).float()
        if not sym:
            zero = torch.round(-low / scale).clamp(1, maxq)
        q = (torch.round(w / scale[:, None]) + zero[:, None]).clamp(0, maxq)
        error = ((scale[:, None] * (q - zero[:, None]) - w).abs().pow(norm) * importance).sum(1)
        best_ratio = torch.where(error < best, ratio, best_ratio)
        best = torch.minimum(best, error)
    return best_ratio if ratio_of_best else best


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(),
       rows=st.integers(1, 24), columns=st.sampled_from([8, 32, 64, 128]), outliers=st.booleans())
def test_uniform_search_never_increases_the_weighted_error_and_finds_the_least(seed, bits, sym, rows, columns, outliers):
    w, importance = random_rows(seed, rows, columns, outliers)
    plain_scale, plain_zero = grid_params(w, bits, sym)
    scale, zero = searched_grid_params(w, importance, bits, sym)
    searched = weighted_rounding_error(w, scale, zero, bits, importance)
    plain = weighted_rounding_error(w, plain_scale, plain_zero, bits, importance)
    assert (searched <= plain).all()
    torch.testing.assert_close(searched, brute_force_uniform(w, importance, bits, sym), rtol=1e-5, atol=1e-6)
    assert torch.equal(scale, scale.half().float())  # stored as float16 without rounding
    assert ((zero >= 1) & (zero <= 2**bits - 1)).all() and torch.equal(zero, zero.round())


def nearest_code_error(w, scale, importance, code_book):
    """The weighted error of rounding w [n, B] to the nearest code value times scale [n] (by argmin, not
    by the quantizer's bucket bounds), the value stored in bf16 as the loader sees it."""
    s = scale.unsqueeze(1)
    scaled = (w * torch.where(s != 0, 1 / s, torch.zeros_like(s))).clamp(-1, 1)
    codes = (scaled.unsqueeze(-1) - code_book).abs().argmin(-1)
    value = (code_book[codes] * s).to(torch.bfloat16).float()
    return (value - w).square() @ importance


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 16), blocks=st.integers(1, 4),
       quant_type=st.sampled_from(["nf4", "fp4"]), outliers=st.booleans())
def test_nf4_search_never_increases_the_weighted_block_error(seed, rows, blocks, quant_type, outliers):
    blocksize = 64
    w, importance = random_rows(seed, rows, blocks * blocksize, outliers)
    weight = w.to(torch.bfloat16)
    code_book = bnb.get_4bit_type(quant_type, device="cpu")
    absmax = w.reshape(rows, blocks, blocksize).abs().amax(2)
    searched = searched_absmax(weight, importance, blocksize, code_book)
    for b in range(blocks):
        columns = slice(b * blocksize, (b + 1) * blocksize)
        error = lambda scale: nearest_code_error(w[:, columns], scale, importance[columns], code_book)
        assert (error(searched[:, b]) <= error(absmax[:, b])).all()
        # the choice is one of the candidates: absmax times a ratio
        ratios = searched[:, b] / absmax[:, b]
        assert all(min(abs(r - c) for c in CLIP_RATIOS) < 1e-6 for r in ratios.tolist())


def test_search_lowers_the_weighted_error_of_heavy_tailed_rows():
    """Not only never worse: on rows with outliers clipping pays, at 3 and 4 bits."""
    w, importance = random_rows(0, 256, 128, outliers=True)
    for bits in (3, 4):
        plain = weighted_rounding_error(w, *grid_params(w, bits, True), bits, importance).sum()
        searched = weighted_rounding_error(w, *searched_grid_params(w, importance, bits, True), bits, importance).sum()
        assert searched < 0.9 * plain


def test_search_weighs_errors_by_their_cube_not_their_square():
    """GPTQ at 3 bits lost to llm-compressor's imatrix observer until the search took |error|**3, as that
    observer does (BENCHMARKS.md, "search-norm"): a cube charges a clipped outlier more than many small rounding
    errors, so the search mostly clips less than the squared error would. The choice is the cube's, row by row."""
    assert SEARCH_NORM == 3
    w, importance = random_rows(2, 512, 64, outliers=True)
    scale, _ = searched_grid_params(w, importance, 3, True)
    chosen = scale / grid_params(w, 3, True)[0]
    cube = brute_force_uniform(w, importance, 3, True, norm=3, ratio_of_best=True)
    square = brute_force_uniform(w, importance, 3, True, norm=2, ratio_of_best=True)
    assert (chosen - cube).abs().max() < 2e-3  # the cube's ratio, as far as a float16 scale realises it
    assert (chosen > square + 5e-3).float().mean() > 0.3 > (chosen < square - 5e-3).float().mean()


def test_search_follows_the_importance_not_the_plain_error():
    """One column carries all the weight: the search protects it, where the unweighted choice would not."""
    w, _ = random_rows(1, 64, 32, outliers=True)
    important = torch.zeros(32)
    important[w.abs().argmax(1)[0]] = 1.0  # the column holding row 0's largest value
    uniform = torch.ones(32)
    for importance in (important, uniform):
        scale, zero = searched_grid_params(w, importance, 3, True)
        others = searched_grid_params(w, uniform if importance is important else important, 3, True)
        assert (weighted_rounding_error(w, scale, zero, 3, importance)
                <= weighted_rounding_error(w, *others, 3, importance)).all()
    assert not torch.equal(searched_grid_params(w, important, 3, True)[0], searched_grid_params(w, uniform, 3, True)[0])


def random_problem(seed: int, rows: int = 32, columns: int = 256):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(columns, 1024, generator=gen) * torch.rand(columns, 1, generator=gen).pow(2).mul(4)
    w, _ = random_rows(seed, rows, columns, outliers=True)
    return w, X @ X.T / 512


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_with_search_keeps_float16_scales_and_lowers_the_error(act_order, static_groups, sym):
    w, H = random_problem(0)
    config = GPTQConfig(bits=3, group_size=64, sym=sym, act_order=act_order, static_groups=static_groups)
    errors = {}
    for search in (False, True):
        q, _ = gptq_quantize(w, H, GPTQConfig(**{**config.__dict__, "scale_search": search}))
        assert torch.equal(q.scales, q.scales.half().float())
        d = w - q.dequantize()
        errors[search] = float(((d @ H) * d).sum())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, True), (True, False)])
def test_gptq_search_weighs_each_column_by_what_the_sweep_cannot_compensate(act_order, static_groups, monkeypatch):
    """The weight of column k is 1 / [(H_{>=k, >=k})^-1]_kk in solving order (damped H): the precision of input
    k given the inputs solved after it, which is what the sweep's objective charges per squared rounding error."""
    import lowbit.quantize.gptq as gptq
    import lowbit.quantize.grid as grid

    w, H = random_problem(3, rows=8, columns=128)
    seen = []
    real = grid.searched_grid_params
    for module in (gptq, grid):  # groups in sweep order search in gptq.py, static groups in grid.grid_params_per_group
        monkeypatch.setattr(module, "searched_grid_params",
                            lambda w, weights, *a: (seen.append(weights), real(w, weights, *a))[1])
    config = GPTQConfig(bits=4, group_size=32, act_order=act_order, static_groups=static_groups, scale_search=True,
                        search_weights="sweep")
    gptq_quantize(w, H, config)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(128)
    damped = H[perm][:, perm].double() + config.damp * H.diagonal().double().mean() * torch.eye(128, dtype=torch.float64)
    conditional = torch.tensor([1 / torch.linalg.inv(damped[k:, k:])[0, 0] for k in range(128)])
    position = torch.argsort(perm)
    groups = [position[g * 32 : (g + 1) * 32] if static_groups else torch.arange(g * 32, (g + 1) * 32) for g in range(4)]
    assert len(seen) == 4
    for weights, columns in zip(seen, groups):
        torch.testing.assert_close(weights.double(), conditional[columns].double(), rtol=1e-3, atol=0)
    # not the plain diagonal: early columns lean on later ones
    assert not torch.allclose(seen[0], H[perm][:, perm].diagonal()[groups[0]], rtol=0.05)
    seen.clear()
    gptq_quantize(w, H, GPTQConfig(**{**config.__dict__, "search_weights": "diag"}))  # the default
    assert GPTQConfig().search_weights == "diag"
    for weights, columns in zip(seen, groups):
        assert torch.equal(weights, H[perm][:, perm].diagonal()[columns])


def test_unknown_search_weights_is_a_usage_error():
    from lowbit.errors import UsageError

    with pytest.raises(UsageError, match="scale search weights"):
        GPTQConfig(search_weights="plain")


def test_rtn_with_search_needs_the_hessian_diagonal_and_uses_it():
    from lowbit.errors import UsageError

    w, H = random_problem(1)
    config = GPTQConfig(bits=3, group_size=64, scale_search=True)
    with pytest.raises(UsageError):
        rtn_quantize(w, config)
    errors = {}
    for name, q in (("plain", rtn_quantize(w, GPTQConfig(bits=3, group_size=64))),
                    ("searched", rtn_quantize(w, config, H.diagonal()))):
        d = w - q.dequantize()
        errors[name] = float((d.square() * H.diagonal()).sum())
    assert errors["searched"] < errors["plain"]


@pytest.mark.parametrize("double_quant", [False, True])
def test_calibrated_nf4_with_search_stores_the_absmax_its_sweep_used(double_quant):
    w, H = random_problem(2, rows=16, columns=128)
    weight = w.to(torch.bfloat16)
    config = BnbConfig(double_quant=double_quant, scale_search=True)
    tensors, dequantized, stats = quantize_bnb(weight, config, H)
    assert stats["calibrated"]
    plain_tensors, _, _ = quantize_bnb(weight, BnbConfig(double_quant=double_quant))
    shapes = lambda ts: {k: (v.dtype, None if "quant_state" in k else v.shape) for k, v in ts.items()}  # JSON: offset's digits vary
    assert shapes(tensors) == shapes(plain_tensors)
    # the file's scales are the searched ones (as stored), and the loader's values are what the sweep aimed at
    state = bnb.QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"},
                                     device=torch.device("cpu"))
    stored = effective_absmax(state).reshape(16, 2)
    searched = searched_absmax(weight, H.diagonal(), 64, state.code)
    if double_quant:
        torch.testing.assert_close(stored, searched, rtol=0.02, atol=1e-3)
    else:
        assert torch.equal(stored, searched)
    assert not torch.equal(tensors["weight.absmax"], plain_tensors["weight.absmax"])
    codes = torch.stack([tensors["weight"][:, 0] >> 4, tensors["weight"][:, 0] & 15], 1).reshape(16, 128).long()
    expected = (state.code[codes] * stored.repeat_interleave(64, 1)).to(torch.bfloat16).float()
    assert torch.equal(dequantized, expected)


def test_rtn_or_nf4_scale_search_without_calibration_is_a_usage_error(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    for method in ("rtn", "nf4"):
        result = CliRunner().invoke(app, ["quantize", str(tmp_path), "-o", str(tmp_path / "out"), "--method", method,
                                          "--scale-search"])
        assert result.exit_code == 2 and "--calibration" in result.output, result.output
        assert not (tmp_path / "out").exists()
