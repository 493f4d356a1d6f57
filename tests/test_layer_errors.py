"""GPTQ with lowbit's defaults against RTN on real layers, scored on held-out calibration windows.

Hessians to solve with and to score with come from disjoint c4 windows (the two halves of
the sample), so a solver that overfits its calibration loses here. Two decoder layers of
each model; benchmarks/layer_errors.py runs the same comparison for every variant.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from benchmarks.layer_errors import C4, collect_linear_inputs, output_error
from lowbit.quantize.driver import make_solver
from lowbit.quantize.settings import QuantizeSettings
from tests.conftest import CACHE

pytestmark = pytest.mark.slow

MIN_WIN_RATE = 0.85  # GPTQ below RTN on at least this share of the Linears
MAX_MEDIAN_RATIO = 0.8  # and its median error ratio to RTN at most this


@pytest.fixture(scope="module")
def gemma3_dir() -> Path:
    folder = CACHE / "gemma3-270m-bf16"
    if not (folder / "config.json").exists():
        pytest.skip(f"Gemma-3-270M not cached at {folder}")
    return folder


@pytest.mark.parametrize("model", ["smollm2_dir", "gemma3_dir"])
def test_default_gptq_beats_rtn_on_held_out_windows(model, request):
    if not C4.exists():
        pytest.skip(f"no c4 sample at {C4}")
    linears = collect_linear_inputs(request.getfixturevalue(model), layers=[0, 1], nsamples=12, seqlen=256)
    gptq = make_solver(QuantizeSettings(method="gptq", bits=4, group_size=64))  # every other setting: the default
    rtn = make_solver(QuantizeSettings(method="rtn", bits=4, group_size=64, scale_search=False))
    ratios = []
    for linear in linears:
        rtn_error = output_error(linear.weight, rtn(linear.weight, None, None).dequantized, linear.held_out)
        gptq_error = output_error(linear.weight, gptq(linear.weight, linear.solve, None).dequantized, linear.held_out)
        ratios.append(gptq_error / rtn_error)
    wins = sum(r < 1 for r in ratios)
    median = statistics.median(ratios)
    print(f"{model}: GPTQ below RTN on {wins}/{len(ratios)} Linears, median error ratio {median:.3f}")
    assert wins >= MIN_WIN_RATE * len(ratios), [f"{l.name}: {r:.3f}" for l, r in zip(linears, ratios)]
    assert median <= MAX_MEDIAN_RATIO
