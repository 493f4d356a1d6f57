"""Act-order with static groups: columns solved by decreasing Hessian diagonal, groups left in place.

The checkpoint then has a trivial g_idx and says desc_act: false, so kernels that need
groups in column order (Marlin, exllama) run it; the loader reads back what the solver made.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.calibration.windows import CalibrationConfig
from lowbit.quantize import driver
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.checkpoint import SafetensorsCheckpoint, load_config_dict
from lowbit.quantize.gptq import GPTQConfig, gptq_quantize
from lowbit.quantize.loader import DenseWeights
from lowbit.quantize.settings import QuantizeSettings
from tests.conftest import save_tiny_model

GROUP = 32


def quantize_tiny(tmp_path, monkeypatch, **settings):
    """Quantize a tiny Llama; returns (output folder, {module: dequantized weight the solver produced})."""
    folder = save_tiny_model(tmp_path / "tiny", layers=2)
    produced = []
    make_solver = driver.make_solver

    def recording_solver(s):
        solve = make_solver(s)

        def wrapped(weight, hessian, bias, consume_hessian=False, sample=None):
            solved = solve(weight, hessian, bias, consume_hessian, sample)
            produced.append(solved.dequantized.clone())
            return solved
        return wrapped

    solve_stacked = driver.solve_stacked

    def recording_stacked(*args, **kwargs):  # q/k/v, solved as one
        solved = solve_stacked(*args, **kwargs)
        produced.extend(one.dequantized.clone() for one in solved)
        return solved

    monkeypatch.setattr(driver, "make_solver", recording_solver)
    monkeypatch.setattr(driver, "solve_stacked", recording_stacked)
    output = tmp_path / "out"
    driver.quantize_model(str(folder), output, QuantizeSettings(method="gptq", bits=4, group_size=GROUP,
                                                                **{"awq_scales": False, **settings}),
                          CalibrationConfig(source="pydoc", nsamples=4, seqlen=64))
    arch = architecture_of(load_config_dict(folder))
    order = [arch.layer_prefix(i) + name for i in range(arch.num_layers) for group in arch.groups for name in group]
    assert len(order) == len(produced)
    return output, dict(zip(order, produced))


def dense_weight(weights: DenseWeights, module: str) -> torch.Tensor:
    """model.layers.0.mlp.up_proj -> its weight as the loader dequantizes it (read_prefix strips the prefix)."""
    layer = module.split(".")[:3]
    prefix = ".".join(layer) + "."
    return weights.read_prefix(prefix)[module[len(prefix):] + ".weight"]


@pytest.mark.parametrize("sym", [True, False])
def test_act_order_in_place_writes_desc_act_false_trivial_g_idx_and_loads_back(sym, tmp_path, monkeypatch):
    output, produced = quantize_tiny(tmp_path, monkeypatch, act_order=True, static_groups=True, sym=sym)
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["desc_act"] is False
    assert config["quantization_config"]["sym"] is sym
    assert json.loads((output / "quantize_config.json").read_text())["desc_act"] is False
    checkpoint = SafetensorsCheckpoint(output)
    weights = DenseWeights(output)
    for module, dequantized in produced.items():
        g_idx = checkpoint.read(module + ".g_idx")
        assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // GROUP)
        assert torch.equal(dense_weight(weights, module), dequantized), module


def test_act_order_with_groups_in_sweep_order_writes_desc_act_true(tmp_path, monkeypatch):
    output, produced = quantize_tiny(tmp_path, monkeypatch, act_order=True, static_groups=False)
    assert json.loads((output / "config.json").read_text())["quantization_config"]["desc_act"] is True
    checkpoint = SafetensorsCheckpoint(output)
    trivial = [torch.equal(checkpoint.read(m + ".g_idx"), torch.arange(checkpoint.read(m + ".g_idx").numel(),
                                                                      dtype=torch.int32) // GROUP) for m in produced]
    assert not all(trivial)
    weights = DenseWeights(output)
    assert all(torch.equal(dense_weight(weights, m), d) for m, d in produced.items())


@pytest.mark.parametrize("scale_search", [False, True])
def test_in_place_groups_take_their_scales_from_the_original_columns(scale_search):
    """Same groups as without act-order (columns k // G), only the solving order differs."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(128, 512, generator=gen) * torch.rand(128, 1, generator=gen).mul(3)
    W = torch.randn(16, 128, generator=gen)
    config = GPTQConfig(bits=4, group_size=GROUP, act_order=True, static_groups=True, scale_search=scale_search)
    q, _ = gptq_quantize(W, X @ X.T / 512, config)
    assert torch.equal(q.g_idx, torch.arange(128, dtype=torch.int32) // GROUP)
    # every column is on the grid of its own group: code = round(w / scale) + zero fits in place
    dq = q.dequantize()
    scales = q.scales[q.g_idx.long()].T
    assert torch.allclose(dq / scales, torch.round(dq / scales), atol=1e-4)
