"""--fast-matmul (the default): the calibration passes and Hessian sums run with torch's "medium" float32
matmul precision, the solver and the input-scale search with "highest"; --exact-matmul runs all of it in full
float32; the caller's own setting comes back afterwards, also when the run fails."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lowbit.calibration.windows import CalibrationConfig
from lowbit.cli import app
from lowbit.quantize import driver, gptq, input_scales
from lowbit.quantize.settings import QuantizeSettings
from lowbit.quantize.solve import HessianAccumulator
from lowbit.quantize.stream import matmul_precision
from tests.conftest import save_tiny_model


@pytest.fixture
def seen(monkeypatch) -> dict[str, set[str]]:
    """The float32 matmul precision each phase ran under."""
    seen: dict[str, set[str]] = {"hessian": set(), "sweep": set(), "input scales": set()}

    def spy(phase, real):
        def wrapped(*args, **kwargs):
            seen[phase].add(torch.get_float32_matmul_precision())
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(HessianAccumulator, "add", spy("hessian", HessianAccumulator.add))
    monkeypatch.setattr(gptq, "_sweep_stacked", spy("sweep", gptq._sweep_stacked))
    monkeypatch.setattr(input_scales, "search_input_scale", spy("input scales", input_scales.search_input_scale))
    return seen


@pytest.fixture
def callers_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield "high"
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(("fast", "passes"), [(True, "medium"), (False, "highest")])
def test_passes_follow_the_setting_and_the_solver_is_always_exact(tmp_path, seen, callers_precision, fast, passes):
    model = save_tiny_model(tmp_path / "model", layers=2)
    driver.quantize_model(str(model), tmp_path / "out", QuantizeSettings(group_size=32, fast_matmul=fast),
                          CalibrationConfig(source="pydoc", nsamples=3, seqlen=48))
    assert seen == {"hessian": {passes}, "sweep": {"highest"}, "input scales": {"highest"}}
    assert torch.get_float32_matmul_precision() == callers_precision


def test_the_callers_precision_comes_back_when_the_block_raises(callers_precision):
    with pytest.raises(RuntimeError, match="boom"):
        with matmul_precision(fast=True):
            assert torch.get_float32_matmul_precision() == "medium"
            raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == callers_precision


def test_exact_matmul_from_the_cli_reaches_the_passes_and_the_manifest(tmp_path, seen):
    model = save_tiny_model(tmp_path / "model", layers=1)
    result = CliRunner().invoke(app, ["quantize", str(model), "-o", str(tmp_path / "out"), "--group-size", "32",
                                      "--calibration", "pydoc", "--nsamples", "2", "--seqlen", "32", "--exact-matmul"])
    assert result.exit_code == 0, result.output
    assert seen["hessian"] == {"highest"}
    manifest = json.loads((tmp_path / "out" / "lowbit_manifest.json").read_text())
    assert manifest["settings"]["fast_matmul"] is False
