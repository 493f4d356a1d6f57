"""benchmarks/mixed_residual_probe.py scores a candidate by what its sublayer writes into the residual stream. Its
MLP branch is run from the architecture's norms: a candidate for gate/up changes the decoder layer's output by
exactly the MLP update's change, so the probe's error must equal the one read off the real layer's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.mixed_residual_probe import layer_inputs, residual_errors
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.mixed import Option, Unit
from lowbit.quantize.pack import UNQUANTIZED, LinearFormat
from tests.conftest import tiny_config


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])  # pre-norm, and Gemma 3's sandwich norms
def test_an_mlp_candidate_scores_the_change_of_the_layer_output_relative_to_it(arch_name):
    torch.manual_seed(0)
    config = tiny_config(arch_name, layers=2)
    dense = AutoModelForCausalLM.from_config(config).eval()
    candidate = copy.deepcopy(dense)
    with torch.no_grad():
        up = candidate.model.layers[1].mlp.up_proj.weight
        up.add_(0.05 * torch.randn_like(up))
    arch = architecture_of(config.to_dict())
    fmt = LinearFormat(4, 32)
    unit = Unit(("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"),
                (Option(fmt, 1, 0.0), Option(UNQUANTIZED, 2, 0.0)))
    with torch.no_grad():
        inputs = layer_inputs(dense, torch.randint(3, 256, (2, 12)))
        errors = residual_errors([unit], {UNQUANTIZED: dense, fmt: candidate}, arch.norms, inputs)

        base, changed = _layer_output(dense, 1, inputs[1]), _layer_output(candidate, 1, inputs[1])
    expected = float(((changed - base).square().sum(-1) / base.square().sum(-1)).mean())

    assert errors[(unit.modules, UNQUANTIZED)] == 0.0
    assert expected > 1e-6
    assert errors[(unit.modules, fmt)] == pytest.approx(expected, rel=1e-3)


def _layer_output(model, index: int, captured: tuple) -> torch.Tensor:
    hidden, position_embeddings, mask = captured
    out = model.model.layers[index](hidden, position_embeddings=position_embeddings, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out
