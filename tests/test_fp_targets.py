"""Fitting each Linear towards the unquantized model's outputs (quantize/fp_targets.py, GPTAQ)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from lowbit.calibration.windows import CalibrationConfig
from lowbit.manifest import MANIFEST
from lowbit.quantize import driver, job
from lowbit.quantize.arch import model_shape
from lowbit.quantize.fit import HOST_SHARE
from lowbit.quantize.fp_targets import damped_factor, fp_target_rows
from lowbit.quantize.plan import PlanSettings, peaks, quantize_phases
from lowbit.quantize.settings import InvalidSetting, QuantizeSettings
from lowbit.quantize.solve import HessianAccumulator
from tests.conftest import save_tiny_model


def inputs(seed: int, tokens: int = 3000, columns: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated unquantized inputs X [T, K] and the quantized model's X~ = X plus an error."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, columns, generator=generator) @ torch.randn(columns, columns, generator=generator)
    return X, X + 0.3 * torch.randn(tokens, columns, generator=generator)


def test_the_full_undamped_step_is_the_least_squares_fit_of_the_unquantized_outputs():
    X, X_q = inputs(0)
    W = torch.randn(10, X.shape[1], generator=torch.Generator().manual_seed(1))
    n = X.shape[0]
    H, C = 2 / n * X_q.T @ X_q, 2 / n * (X - X_q).T @ X_q
    fitted = fp_target_rows(W, damped_factor(H, 0.0), C, share=1.0)
    least_squares = torch.linalg.lstsq(X_q, X @ W.T).solution.T
    torch.testing.assert_close(fitted, least_squares, rtol=1e-4, atol=1e-4)
    # so Q = W* on the quantized inputs comes closer to the unquantized outputs than W itself; a part of
    # the step part of the way
    miss = lambda Q: float((X_q @ Q.T - X @ W.T).square().sum())  # noqa: E731
    part = fp_target_rows(W, damped_factor(H, 0.01), C)
    assert miss(fitted) < miss(part) < miss(W)


def test_the_accumulator_pairs_each_window_with_its_own_targets_and_leaves_them_as_they_are():
    X, X_q = inputs(2, tokens=4 * 50)
    targets = X.reshape(4, 50, -1).clone()
    accumulator = HessianAccumulator(X.shape[1], torch.device("cpu"), targets=targets)
    for window in (2, 0, 3, 1):  # in any order: the index pairs them
        accumulator.add(X_q.reshape(4, 50, -1)[window], window)
    assert torch.equal(targets, X.reshape(4, 50, -1))
    cross = accumulator.cross_mean()
    torch.testing.assert_close(cross, 2 / 200 * (X - X_q).T @ X_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(accumulator.mean(), 2 / 200 * X_q.T @ X_q, rtol=1e-4, atol=1e-4)


def test_settings_apply_fp_targets_to_calibrated_hessian_methods_only():
    assert QuantizeSettings().resolved(True).fp_targets is False  # 4 bits: opt-in
    assert QuantizeSettings(bits=3).resolved(True).fp_targets is True  # below: on
    assert QuantizeSettings(bits=3, fp_targets=False).resolved(True).fp_targets is False
    assert QuantizeSettings(fp_targets=True).resolved(True).fp_targets is True
    assert QuantizeSettings(method="nf4").resolved(True).fp_targets is True  # calibrated nf4/fp4: on
    assert QuantizeSettings(method="fp4", fp_targets=False).resolved(True).fp_targets is False
    assert QuantizeSettings(method="nf4", fp_targets=True).resolved(False).fp_targets is False  # no windows
    assert QuantizeSettings(method="nf4").resolved(False).fp_targets is False
    with pytest.raises(InvalidSetting, match="fp_targets"):
        QuantizeSettings(method="rtn", fp_targets=True)


def quantize(model, out, fp_targets: bool, bits: int = 4) -> dict[str, torch.Tensor]:
    settings = QuantizeSettings(bits=bits, group_size=32, fp_targets=fp_targets, awq_scales=False)
    driver.quantize_model(str(model), out, settings, CalibrationConfig(source="pydoc", nsamples=4, seqlen=64))
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_the_first_attention_inputs_are_the_unquantized_ones_so_only_later_linears_move(tmp_path, arch):
    """Layer 0's q/k/v see the embeddings in both streams: their cross sum is zero, their codes unchanged. Every
    later group sees inputs the quantized layers before it changed, and is fit towards the unquantized ones."""
    model = save_tiny_model(tmp_path / "model", arch, layers=2)
    plain, fitted = quantize(model, tmp_path / "plain", False), quantize(model, tmp_path / "fitted", True)
    assert plain.keys() == fitted.keys()
    firsts = [f"model.layers.0.self_attn.{m}.qweight" for m in ("qkv_proj", "q_proj", "k_proj", "v_proj")]
    firsts = [k for k in firsts if k in plain]
    assert len(firsts) == (1 if arch == "phi3" else 3)
    assert all(torch.equal(plain[k], fitted[k]) for k in firsts)
    later = [k for k in plain if k.endswith(".qweight") and k not in firsts]
    moved = [k for k in later if not torch.equal(plain[k], fitted[k])]
    assert moved == later


def test_default_fp_targets_turn_off_where_the_host_cannot_hold_them(tmp_path, monkeypatch, caplog):
    """On by default for calibrated NF4, the fit is turned off, with a warning, where what it keeps would take the
    host past its share of memory while the run without it would not; asked for (--fp-targets), it stays on."""
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    shape = model_shape(json.loads((model / "config.json").read_text()))
    plan = PlanSettings(quantize=QuantizeSettings(method="nf4").resolved(True), nsamples=4, seqlen=64, device="cpu")
    without = replace(plan, quantize=replace(plan.quantize, fp_targets=False))
    host_with, host_without = (peaks(quantize_phases(shape, s), s)[1].bytes for s in (plan, without))
    assert host_without < host_with
    calibration = CalibrationConfig(source="pydoc", nsamples=4, seqlen=64)

    def fp_targets_of(out, settings: QuantizeSettings, host_bytes: int) -> bool:
        monkeypatch.setattr(job, "host_memory_bytes", lambda: int(host_bytes / HOST_SHARE))
        driver.quantize_model(str(model), out, settings, calibration)
        return json.loads((out / MANIFEST).read_text())["settings"]["fp_targets"]

    between = (host_with + host_without) // 2
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert fp_targets_of(tmp_path / "short", QuantizeSettings(method="nf4"), between) is False
    assert "turned off" in caplog.text
    assert fp_targets_of(tmp_path / "asked", QuantizeSettings(method="nf4", fp_targets=True), between) is True
    assert fp_targets_of(tmp_path / "enough", QuantizeSettings(method="nf4"), host_with) is True
    # too small either way: the fit is not what is short, so it stays (the plan says what does not fit)
    assert fp_targets_of(tmp_path / "tiny", QuantizeSettings(method="nf4"), host_without - 1) is True
