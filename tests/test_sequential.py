"""True-sequential's stepwise passes (quantize/steps.py: sequential_steps) give the same checkpoint as
re-running each layer from its start for every group, and are only taken where they compute the layer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lowbit.calibration.windows import CalibrationConfig
from lowbit.quantize import arch as arch_module
from lowbit.quantize import driver
from lowbit.quantize import solve as solve_module
from lowbit.quantize import steps
from lowbit.quantize import stream
from tests.conftest import save_tiny_model


def quantize_and_count(model, output, monkeypatch) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    calls = {"stepwise": 0, "whole layer": 0}
    real_steps, real_run = driver.sequential_steps, driver.run_layer

    def steps(*args, **kwargs):
        calls["stepwise"] += 1
        return real_steps(*args, **kwargs)

    def run(*args, **kwargs):
        calls["whole layer"] += 1
        return real_run(*args, **kwargs)

    monkeypatch.setattr(driver, "sequential_steps", steps)
    monkeypatch.setattr(driver, "run_layer", run)
    driver.quantize_model(str(model), output, driver.QuantizeSettings(group_size=32),
                          CalibrationConfig(source="pydoc", nsamples=3, seqlen=48))
    monkeypatch.setattr(driver, "sequential_steps", real_steps)
    monkeypatch.setattr(driver, "run_layer", real_run)
    tensors = {}
    for shard in sorted(output.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors, calls


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_stepwise_passes_give_the_same_codes_as_rerunning_the_layer(tmp_path, monkeypatch, arch):
    model = save_tiny_model(tmp_path / "model", arch, layers=2)
    new, new_calls = quantize_and_count(model, tmp_path / "stepwise", monkeypatch)
    monkeypatch.setattr(driver, "_stepwise_possible", lambda *args: (False, False))
    old, old_calls = quantize_and_count(model, tmp_path / "whole", monkeypatch)
    assert new_calls == {"stepwise": 2, "whole layer": 0}
    assert old_calls == {"stepwise": 0, "whole layer": 2}
    assert new.keys() == old.keys() and any(k.endswith("down_proj.qweight") for k in new)
    assert [k for k in new if not torch.equal(new[k], old[k])] == []  # same codes, scales, zeros, bit for bit


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_kept_down_proj_inputs_give_the_same_codes_without_running_gate_up_again(tmp_path, monkeypatch, arch):
    """Where down_proj's inputs are small they are kept from its Hessian pass, and the layer's outputs come from
    them: the MLP's first half runs once a layer, not twice, and the checkpoint is the same bit for bit."""
    model = save_tiny_model(tmp_path / "model", arch, layers=2)
    mlp_passes = {"n": 0}
    real_mlp = steps.run_mlp_residual

    def counted(layer, norms, acts, *args, **kwargs):
        mlp_passes["n"] += acts.hidden.shape[0] > 1  # not steps_match_layer's check, on one window
        return real_mlp(layer, norms, acts, *args, **kwargs)

    monkeypatch.setattr(steps, "run_mlp_residual", counted)
    kept, _ = quantize_and_count(model, tmp_path / "kept", monkeypatch)
    assert mlp_passes["n"] == 2  # one a layer: up to down_proj's input
    monkeypatch.setattr(driver, "down_inputs_kept", lambda *args: 0)  # as if too large to keep
    mlp_passes["n"] = 0
    recomputed, _ = quantize_and_count(model, tmp_path / "recomputed", monkeypatch)
    assert mlp_passes["n"] == 4
    assert kept.keys() == recomputed.keys()
    assert [k for k in kept if not torch.equal(kept[k], recomputed[k])] == []


def test_a_layout_that_does_not_compute_the_layer_falls_back_to_whole_layer_passes(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    reference, _ = quantize_and_count(model, tmp_path / "reference", monkeypatch)
    wrong = arch_module.LayerNorms(after_attention="input_layernorm")  # a norm this layer does not apply
    monkeypatch.setitem(arch_module.LAYER_NORMS, "LlamaForCausalLM", wrong)
    fallback, calls = quantize_and_count(model, tmp_path / "fallback", monkeypatch)
    assert calls == {"stepwise": 0, "whole layer": 2}
    assert all(torch.equal(fallback[k], reference[k]) for k in reference)


def test_gemma3_sandwich_norms_describe_its_layer_and_pre_norms_do_not():
    """Gemma 3 normalises both branches' outputs: its entry in LAYER_NORMS computes its layer, Llama's does not."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from lowbit.quantize import steps

    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, vocab_size=256, sliding_window=16,
                              layer_types=["sliding_attention"], architectures=["Gemma3ForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() == 1 else 0.08)  # norms that are not the identity
    layer = model.model.layers[0]
    caught = {}

    def catch(module, args, kwargs):
        caught.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 40)))  # longer than the sliding window
    handle.remove()
    hidden = caught.pop("hidden")
    caught.pop("hidden_states", None)
    kwargs = {k: v for k, v in caught.items() if k not in ("cache", "past_key_values", "use_cache")}
    acts = stream.Activations(hidden=hidden.clone(), kwargs_by_layer=[kwargs])
    device = torch.device("cpu")
    o_proj = layer.self_attn.o_proj
    assert steps.steps_match_layer(layer, arch_module.LAYER_NORMS["Gemma3ForCausalLM"], o_proj, acts, device)
    assert steps.steps_match_layer(layer, arch_module.LAYER_NORMS["Gemma3ForCausalLM"], o_proj, acts, device,
                                    down=layer.mlp.down_proj)  # its outputs from down_proj's kept input too
    assert not steps.steps_match_layer(layer, arch_module.PRE_NORM, o_proj, acts, device)


@pytest.mark.parametrize("arch,solves", [
    ("llama", [3, 1, 2, 1]),  # q/k/v as one, gate/up as one: rows and Hessian within down_proj's 64 x 128 and 128^2
    ("phi3", [1, 1, 1, 1]),  # qkv_proj and gate_up_proj are fused already
    ("gemma3", [3, 1, 2, 1]),  # q/k/v: (128 + 64 + 64) x 64 + 64^2, within down_proj's too
])
def test_q_k_v_solved_as_one_give_the_codes_of_one_solve_each(tmp_path, monkeypatch, arch, solves):
    """q/k/v, and gate/up, share their input: GPTQ sweeps their stacked rows once (solve.solve_stacked) where
    that stays within the layer's largest solve, and the checkpoint is the one that solving them one by one
    gives, bit for bit."""
    from lowbit.quantize import gptq

    model = save_tiny_model(tmp_path / "model", arch, layers=2)
    stacked_rows = []
    real = gptq.gptq_quantize_stacked

    def counted(weights, *args, **kwargs):
        stacked_rows.append(len(weights))
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize_stacked", counted)  # gptq_quantize_each's
    monkeypatch.setattr(solve_module, "gptq_quantize_stacked", counted)  # solve_stacked's
    together, _ = quantize_and_count(model, tmp_path / "together", monkeypatch)
    assert sorted(stacked_rows) == sorted(solves * 2)
    monkeypatch.setattr(driver, "solved_together", lambda *args: False)
    apart, _ = quantize_and_count(model, tmp_path / "apart", monkeypatch)
    assert together.keys() == apart.keys() and any(k.endswith("o_proj.qweight") for k in together)
    assert [k for k in together if not torch.equal(together[k], apart[k])] == []


def test_what_is_solved_together():
    from lowbit.quantize.settings import QuantizeSettings
    from lowbit.quantize.solve import solved_together

    qkv, gate_up, down = [(64, 32), (16, 32), (16, 32)], [(128, 32)] * 2, [(32, 128)]
    layer = qkv + gate_up + down
    gptq = QuantizeSettings(group_size=32)
    assert solved_together(qkv, layer, gptq)
    assert solved_together(gate_up, layer, gptq)  # 2 x 128 x 32 + 32^2 stacked: within down_proj's 32 x 128 + 128^2
    narrow = [(48, 32)] * 2 + [(32, 48)]  # an MLP barely wider than its input: 2 x 48 x 32 + 32^2 > 32 x 48 + 48^2
    assert not solved_together(narrow[:2], qkv + narrow, gptq)
    assert not solved_together([(64, 32)], layer, gptq)  # a fused Linear is one solve already
    assert not solved_together(qkv, layer, QuantizeSettings(group_size=32, target_bpw=5.0))
    assert not solved_together(qkv, layer, QuantizeSettings(method="nf4"))


def test_kept_inputs_reuse_one_room_paid_for_once():
    acts = stream.Activations(hidden=torch.zeros(3, 8, 16), kwargs_by_layer=[{}])
    room = acts.input_buffer(32).data_ptr()
    assert acts.input_buffer(16).shape == (3, 8, 16)
    assert acts.input_buffer(16).data_ptr() == room and acts.input_buffer(32).data_ptr() == room
    grown = acts.input_buffer(64)
    assert grown.shape == (3, 8, 64) and grown.untyped_storage().nbytes() == 3 * 8 * 64 * 4  # no more than the largest
    del grown
    acts.release_buffer()
    assert acts.input_buffer(8).untyped_storage().nbytes() == 3 * 8 * 8 * 4  # released: made anew, at its own size
