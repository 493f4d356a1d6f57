"""Each calibration window's first position (the attention sink) counted as a fixed share of its window's rows."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.calibration.windows import CalibrationConfig
from lowbit.manifest import MANIFEST
from lowbit.quantize import driver, steps
from lowbit.quantize.settings import InvalidSetting, QuantizeSettings
from lowbit.quantize.solve import HessianAccumulator, first_row_weight
from tests.conftest import save_tiny_model


def test_the_first_position_counts_as_its_share_of_the_window_and_at_least_once():
    assert first_row_weight(1 / 128, 2048) == 16
    assert first_row_weight(1 / 128, 512) == 4
    assert first_row_weight(1 / 128, 64) == 1  # short windows: once, never less
    assert first_row_weight(0, 2048) == 1
    assert QuantizeSettings().first_position_share == 1 / 128
    for share in (-0.1, 1.0):
        with pytest.raises(InvalidSetting, match="first_position_share"):
            QuantizeSettings(first_position_share=share)


def test_a_weighted_first_row_enters_the_hessian_and_the_cross_sum_as_that_many_rows():
    generator = torch.Generator().manual_seed(0)
    windows, tokens, columns, weight = 3, 40, 300, 5  # 300 columns: two bands
    X_q = torch.randn(windows, tokens, columns, generator=generator) * torch.logspace(-1, 1, columns)
    X = X_q + 0.1 * torch.randn(windows, tokens, columns, generator=generator)
    accumulator = HessianAccumulator(columns, torch.device("cpu"), targets=X.clone(), first_row_weight=weight)
    for window in range(windows):
        accumulator.add(X_q[window].clone(), window)
    # the same as the windows with their first row repeated WEIGHT times
    repeated = torch.cat([torch.cat([x[:1].expand(weight - 1, -1), x]) for x in X_q]).double()
    targets = torch.cat([torch.cat([x[:1].expand(weight - 1, -1), x]) for x in X]).double()
    n = repeated.shape[0]
    hessian, cross = accumulator.mean(), accumulator.cross_mean()
    torch.testing.assert_close(hessian.double(), 2 / n * repeated.T @ repeated, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(cross.double(), 2 / n * (targets - repeated).T @ repeated, rtol=1e-4, atol=1e-4)
    assert torch.equal(hessian, hessian.T)


def test_once_is_the_plain_sum_bit_for_bit():
    X = torch.randn(2, 30, 48, generator=torch.Generator().manual_seed(1))
    once, plain = HessianAccumulator(48, torch.device("cpu"), first_row_weight=1), HessianAccumulator(48, torch.device("cpu"))
    for x in X:
        once.add(x)
        plain.add(x)
    assert torch.equal(once.mean(), plain.mean())


def test_a_run_weighs_each_windows_first_row_by_its_windows_length(tmp_path, monkeypatch):
    """The driver gives every Hessian the weight the settings and the window length make; with the
    share at 0 it is counted once, and the codes change with it."""
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    seen = []

    class Recording(HessianAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.first_row_weight)

    monkeypatch.setattr(steps, "HessianAccumulator", Recording)
    calibration = CalibrationConfig(source="pydoc", nsamples=4, seqlen=256)
    codes = {}
    for share, expected in ((1 / 64, 4), (0.0, 1)):
        seen.clear()
        out = tmp_path / f"out-{expected}"
        driver.quantize_model(str(model), out, QuantizeSettings(group_size=32, first_position_share=share), calibration)
        assert seen and set(seen) == {expected}  # every group of every layer
        assert json.loads((out / MANIFEST).read_text())["settings"]["first_position_share"] == share
        codes[expected] = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert codes[4] != codes[1]
