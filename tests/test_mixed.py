"""A size budget (`--target-bpw`): candidates scored in the layer loop, chosen over the model, written as `dynamic`."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.quantize import driver
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.checkpoint import SafetensorsCheckpoint
from lowbit.quantize.gptq import GPTQConfig, gptq_quantize, gptq_quantize_each
from lowbit.quantize.input_scales import SCALES_TAG
from lowbit.quantize.loader import DenseWeights
from lowbit.quantize.mixed import Option, Unit, candidate_formats, choose, total
from lowbit.quantize.pack import UNQUANTIZED, LinearFormat, dequantize_gptq_v1, dynamic_format, dynamic_map
from lowbit.quantize.settings import InvalidSetting, QuantizeSettings
from tests.conftest import save_tiny_model

GPTQ = ["--method", "gptq", "--nsamples", "4", "--seqlen", "32", "--group-size", "64"]
BASE = LinearFormat(4, 64)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    return " ".join(text.split())


# ---- the choice ----

def random_units(rng: random.Random, count: int) -> list[Unit]:
    units = []
    for u in range(count):
        base_bytes, base_error = rng.randint(5, 20), rng.uniform(0.5, 2)
        options = [Option(BASE, base_bytes, base_error)]
        for tag in ("4g32", "8g64", "16"):
            options.append(Option(LinearFormat(16) if tag == "16" else LinearFormat(int(tag[0]), int(tag[2:])),
                                  options[-1].bytes + rng.randint(1, 12), rng.uniform(0, options[0].error)))
        units.append(Unit((f"unit{u}",), tuple(options)))
    return units


def exact(units: list[Unit], budget: int) -> float:
    """The least total error within budget, by trying every combination (small instances only)."""
    best = float("inf")
    for combo in itertools.product(*(unit.options for unit in units)):
        size, error = total(list(combo))
        if size <= budget:
            best = min(best, error)
    return best


def test_greedy_keeps_the_budget_and_is_within_one_step_of_the_exact_knapsack():
    rng = random.Random(0)
    gaps = []
    for _ in range(60):
        units = random_units(rng, 5)
        base = sum(unit.options[0].bytes for unit in units)
        budget = base + rng.randint(0, 40)
        chosen = choose(units, budget)
        size, error = total(chosen)
        assert size <= budget
        best = exact(units, budget)
        assert error >= best - 1e-9
        # the docstring's bound: within the largest single gain of one unit
        assert error <= best + max(u.options[0].error - min(o.error for o in u.options) for u in units) + 1e-9
        gaps.append(error - best)
    assert sum(g < 1e-9 for g in gaps) >= len(gaps) // 2  # and mostly exactly optimal


def test_a_budget_with_room_for_everything_leaves_no_error():
    units = random_units(random.Random(1), 4)
    chosen = choose(units, sum(max(o.bytes for o in u.options) for u in units))
    assert total(chosen)[1] == pytest.approx(sum(min(o.error for o in u.options) for u in units))


def test_candidates_stay_on_marlin_formats_and_cost_more_than_the_base():
    assert candidate_formats(4, 128, 4096, 4096) == [LinearFormat(4, 128), LinearFormat(4, 64), LinearFormat(4, 32),
                                                     LinearFormat(8, 128), UNQUANTIZED]
    assert candidate_formats(4, 64, 64, 64) == [LinearFormat(4, 64), LinearFormat(4, 32), LinearFormat(8, 64),
                                                UNQUANTIZED]
    assert candidate_formats(4, 32, 64, 64) == [LinearFormat(4, 32), LinearFormat(8, 32), UNQUANTIZED]
    assert candidate_formats(4, -1, 64, 128) == [LinearFormat(4, -1), LinearFormat(4, 64), LinearFormat(4, 32),
                                                 LinearFormat(8, -1), UNQUANTIZED]
    assert candidate_formats(4, -1, 64, 96)[1] == LinearFormat(4, 32)  # 64 does not divide K = 96
    assert LinearFormat(4, 32) not in candidate_formats(4, 128, 64, 128 + 16)[1:]  # 32 does not divide K


# ---- scoring: one factor, one sweep per candidate ----

def test_candidates_swept_against_one_factor_equal_separate_solves():
    torch.manual_seed(0)
    x = torch.randn(256, 64) * torch.linspace(0.2, 3, 64)
    hessian, weight = 2 / 256 * x.T @ x, torch.randn(48, 64)
    configs = [GPTQConfig(bits=4, group_size=64, act_order=True, static_groups=True, scale_search=True),
               GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True, scale_search=True),
               GPTQConfig(bits=8, group_size=64, act_order=True, static_groups=True, scale_search=True)]
    together = gptq_quantize_each(weight, hessian.clone(), configs, consume_hessian=True)
    for config, (q, stats) in zip(configs, together):
        alone, alone_stats = gptq_quantize(weight, hessian, config)
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
        assert stats.error == pytest.approx(alone_stats.error, rel=1e-5)
    errors = [stats.error for _, stats in together]
    assert errors[1] < errors[0] and errors[2] < errors[1]  # finer groups, then more bits, lose less


# ---- the dynamic map ----

def test_dynamic_map_round_trips_through_config_json():
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4}
    arch = architecture_of(config)
    rng = random.Random(2)
    formats = {}
    for i in range(arch.num_layers):
        for group in arch.groups:
            fmt = rng.choice([BASE, LinearFormat(4, 32), LinearFormat(8, 64), UNQUANTIZED])
            formats.update({arch.layer_prefix(i) + name: fmt for name in group})
    dynamic = json.loads(json.dumps(dynamic_map(formats, BASE, arch)))
    assert all(key[:2] in ("+:", "-:") for key in dynamic)
    for module, fmt in formats.items():
        assert dynamic_format(dynamic, [module], BASE) == fmt
    for i in range(arch.num_layers):  # vLLM's fused names get the group's format
        prefix = arch.layer_prefix(i)
        assert dynamic_format(dynamic, [prefix + "self_attn.qkv_proj"], BASE) == formats[prefix + "self_attn.q_proj"]
        assert dynamic_format(dynamic, [prefix + "mlp.gate_up_proj"], BASE) == formats[prefix + "mlp.up_proj"]
    assert dynamic_format(dynamic, ["model.layers.10.self_attn.q_proj"], BASE) == BASE  # no prefix confusion


def test_a_group_split_between_formats_is_refused():
    arch = architecture_of({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="share one format"):
        dynamic_map({"model.layers.0.self_attn.q_proj": UNQUANTIZED}, BASE, arch)


# ---- end to end ----

@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text("The budget goes where the error drops the most for each extra byte it costs. " * 40)
    return path


def quantize_mixed(model: Path, out: Path, calibration: Path, target: float, monkeypatch) -> dict:
    """Quantize under a budget; returns what the solver produced, Linear by Linear and format by format."""
    produced: dict[str, dict[LinearFormat, torch.Tensor]] = {}
    keep = driver.keep_candidates

    def record(candidates, stats, module, solved):
        produced[module] = {BASE: solved.dequantized.clone()}
        for fmt, (tensors, _) in solved.candidates.items():
            produced[module][fmt] = dequantize_gptq_v1(tensors, fmt.bits)
        keep(candidates, stats, module, solved)

    monkeypatch.setattr(driver, "keep_candidates", record)
    # without input scales, the checkpoint holds the candidates as solved (tests/test_awq_scales.py: with them)
    result = run("-q", "quantize", model, *GPTQ, "--calibration", calibration, "--target-bpw", target, "-o", out,
                 "--no-awq-scales")
    assert result.exit_code == 0, result.output
    return produced


def formats_of(manifest: dict) -> dict[str, LinearFormat]:
    return {m: LinearFormat(e["bits"], e["group_size"]) for m, e in manifest["layers"].items()}


@pytest.mark.parametrize("target", [5.5, 7.0])
def test_a_mixed_checkpoint_keeps_its_budget_and_loads_as_the_solver_made_it(tmp_path, calibration, monkeypatch, target):
    model = save_tiny_model(tmp_path / "tiny", "llama", layers=2, hidden=64, dtype=torch.bfloat16)
    out = tmp_path / "out"
    produced = quantize_mixed(model, out, calibration, target, monkeypatch)
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert manifest["settings"]["target_bpw"] == target
    assert manifest["bits_per_weight"] <= target
    formats = formats_of(manifest)
    assert set(formats.values()) - {BASE}, "the budget bought nothing"
    arch = architecture_of(config)
    for i in range(arch.num_layers):  # one format per group: vLLM fuses q/k/v and gate/up
        for group in arch.groups:
            assert len({formats[arch.layer_prefix(i) + name] for name in group}) == 1
    dynamic = config["quantization_config"]["dynamic"]
    assert {m: dynamic_format(dynamic, [m], BASE) for m in formats} == formats

    weights, source = DenseWeights(out), SafetensorsCheckpoint(model)
    for module, fmt in formats.items():
        dense = weights.read(module + ".weight")
        if fmt.quantized:
            assert torch.equal(dense, produced[module][fmt]), module
        else:
            assert torch.equal(dense, source.read(module + ".weight")), module

    result = run("inspect", out, "--verify")
    assert result.exit_code == 0, result.output
    assert "formats by layer" in result.output and "q_proj" in result.output


def test_more_budget_means_less_error(tmp_path, calibration, monkeypatch):
    model = save_tiny_model(tmp_path / "tiny", "llama", layers=2, hidden=64, dtype=torch.bfloat16)
    errors = []
    for target in (5.2, 6.5, 9.0):
        out = tmp_path / f"out-{target}"
        quantize_mixed(model, out, calibration, target, monkeypatch)
        manifest = json.loads((out / "lowbit_manifest.json").read_text())
        chosen = formats_of(manifest)
        errors.append(sum(0.0 if not fmt.quantized else
                          (e["error"] if fmt == BASE else e["candidates"][fmt.tag])
                          for (m, e), fmt in ((item, chosen[item[0]]) for item in manifest["layers"].items())))
    assert errors[0] > errors[1] > errors[2]


def test_a_fused_phi3_layer_gets_one_format_for_its_fused_module(tmp_path, calibration, monkeypatch):
    model = save_tiny_model(tmp_path / "phi3", "phi3", layers=2, hidden=64, dtype=torch.bfloat16)
    out = tmp_path / "out"
    produced = quantize_mixed(model, out, calibration, 6.0, monkeypatch)
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    formats = formats_of(manifest)
    assert {m.rsplit(".", 1)[-1] for m in formats} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    weights = DenseWeights(out)
    for module, fmt in formats.items():
        assert dynamic_format(dynamic, [module], BASE) == fmt
        if fmt.quantized:
            assert torch.equal(weights.read(module + ".weight"), produced[module][fmt])
    assert run("inspect", out, "--verify").exit_code == 0


# ---- refusals ----

@pytest.mark.parametrize("options, says", [
    (["--target-bpw", "4"], "--target-bpw"),  # not above the uniform 4-bit's 4.31
    (["--target-bpw", "17"], "at most 16"),
    (["--method", "nf4", "--target-bpw", "4.1"], "must be above 4.125 (what nf4 costs)"),
])
def test_the_cli_refuses_a_bad_target_in_one_line(tmp_path, options, says):
    model = save_tiny_model(tmp_path / "tiny", "llama", layers=1, hidden=64)
    result = run("quantize", model, "--group-size", "64", *options, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert says in one_line(result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_target_under_what_g_idx_costs_on_this_model_is_refused(tmp_path, calibration):
    model = save_tiny_model(tmp_path / "tiny", "llama", layers=1, hidden=64)
    # nominal 4.3125 bits at group size 64, but g_idx adds 32 bits per input column: ~0.5 per weight here
    result = run("quantize", model, *GPTQ, "--calibration", calibration, "--target-bpw", "4.4", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "below what 4-bit, group size 64 costs" in one_line(result.output)
    assert len(result.output.strip().splitlines()) == 1


def test_settings_hold_the_target_rule():
    assert QuantizeSettings(target_bpw=4.5).target_bpw == 4.5
    with pytest.raises(InvalidSetting, match="target_bpw"):
        QuantizeSettings(bits=8, target_bpw=8.1)  # 8-bit at group 128 costs 8.19
    with pytest.raises(InvalidSetting, match="skip"):
        QuantizeSettings(target_bpw=5, skip="down_proj")


def test_an_interrupted_mixed_run_resumes_to_the_same_bytes(tmp_path, calibration, monkeypatch):
    """The candidates' tensors are kept per layer in the progress folder, so the choice after a resume is
    made from the same scores as an uninterrupted run's."""
    from tests.test_resume import EPOCH, assert_same_files, interrupt_after_layers

    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    model = save_tiny_model(tmp_path / "tiny", "llama", layers=3, hidden=64, dtype=torch.bfloat16)
    args = ["-q", "quantize", model, *GPTQ, "--calibration", calibration, "--target-bpw", "6"]
    with monkeypatch.context() as patch:
        interrupt_after_layers(patch, 2)
        assert run(*args, "-o", tmp_path / "resumed").exit_code == 130
    kept = tmp_path / "resumed.partial" / ".lowbit-progress" / "candidates"
    assert list(kept.glob("*/layer-00001.safetensors"))
    assert (kept / SCALES_TAG / "layer-00001.safetensors").exists()  # the input scales a 16-bit Linear needs
    assert run(*args, "-o", tmp_path / "resumed").exit_code == 0
    assert run(*args, "-o", tmp_path / "uninterrupted").exit_code == 0
    assert_same_files(tmp_path / "resumed", tmp_path / "uninterrupted")


def test_a_recipe_takes_the_target_and_points_at_its_key(tmp_path):
    from lowbit.errors import UsageError
    from lowbit.recipe_file import load_recipe

    recipe = tmp_path / "recipe.toml"
    table = '[model]\nsource = "model"\n[output]\ndir = "out"\n[quantize]\nmethod = "gptq"\ntarget_bpw = {}\n'
    recipe.write_text(table.format(4.75))
    assert load_recipe(recipe).settings.target_bpw == 4.75
    recipe.write_text(table.format(4))
    with pytest.raises(UsageError, match="quantize.target_bpw must be above"):
        load_recipe(recipe)


def test_a_dynamic_key_that_is_no_regex_is_a_corrupt_config():
    from lowbit.errors import CorruptInputError

    with pytest.raises(CorruptInputError, match="not a regular expression"):
        dynamic_format({"+:model.layers.(0": {"bits": 8}}, ["model.layers.0.mlp.down_proj"], BASE)
    # gptqmodel's own spelling without "+:" is a positive key
    assert dynamic_format({r"model\.layers\.0\.": {"bits": 8}}, ["model.layers.0.mlp.down_proj"], BASE) == LinearFormat(8, 64)


# ---- NF4 under a budget: NF4 or 16-bit per group, written as llm_int8_skip_modules ----

@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated"])
def test_nf4_under_a_budget_keeps_it_and_transformers_loads_the_skipped_modules_dense(tmp_path, calibration, calibrated):
    from transformers import AutoModelForCausalLM

    model = save_tiny_model(tmp_path / "tiny", "llama", layers=2, hidden=128, dtype=torch.bfloat16)
    out = tmp_path / "out"
    calib = ["--calibration", calibration, "--nsamples", "4", "--seqlen", "32"] if calibrated else []
    result = run("-q", "quantize", model, "--method", "nf4", *calib, "--target-bpw", "8", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    assert manifest["bits_per_weight"] <= 8  # NF4 costs ~5.4 here: a Linear's tables
    dense = {m for m, e in manifest["layers"].items() if e["bits"] == 16}
    assert dense and len(dense) < len(manifest["layers"]), "the budget bought nothing, or everything"
    arch = architecture_of(json.loads((model / "config.json").read_text()))
    for i in range(arch.num_layers):  # one choice per group (vLLM fuses q/k/v and gate/up)
        for group in arch.groups:
            assert len({arch.layer_prefix(i) + name in dense for name in group}) == 1
    # what the choice weighed: plain, the relative weight-space error; calibrated, the Hessian's output error
    source, weights = SafetensorsCheckpoint(model), DenseWeights(out)
    for module in set(manifest["layers"]) - dense:
        w = source.read(module + ".weight").float()
        relative = float((weights.read(module + ".weight").float() - w).square().sum() / w.square().sum())
        assert (manifest["layers"][module]["error"] == pytest.approx(relative, rel=1e-3)) == (not calibrated), module
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert dense <= set(skip)

    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    for name, module in theirs.named_modules():
        if name in manifest["layers"]:
            assert (type(module).__name__ == "Linear4bit") == (name not in dense), name
            if name in dense:
                assert torch.equal(module.weight.to(torch.bfloat16), source.read(name + ".weight")), name
    shown = run("inspect", out, "--verify")
    assert shown.exit_code == 0 and "formats by layer" in shown.output and " 16 " in f" {shown.output} ".replace("\n", " ")


# ---- the "update" weighting ----

def test_a_sublayers_share_is_a_mean_over_tokens_that_a_massive_token_does_not_drown():
    from lowbit.quantize.steps import UpdateShare

    torch.manual_seed(0)
    hidden, update = torch.randn(1, 8, 16), 0.1 * torch.randn(1, 8, 16)
    hidden[0, 0] *= 1e4  # one token with massive activations
    share = UpdateShare()
    share.add(hidden[:, :4], update[:, :4])  # two windows' worth, added apart
    share.add(hidden[:, 4:], update[:, 4:])
    per_token = [float(u.square().sum() / (h + u).square().sum()) for h, u in zip(hidden[0], update[0])]
    assert share.total / share.tokens == pytest.approx(sum(per_token) / 8, rel=1e-5)
    energy_ratio = float(update.square().sum() / (hidden + update).square().sum())
    assert share.total / share.tokens > 100 * energy_ratio  # what a mean over all energies would have given


def test_a_budget_run_records_each_sublayers_share_and_the_update_weighting_scales_errors_by_it(
        tmp_path, calibration, monkeypatch):
    from lowbit.quantize.mixed import score_of

    model = save_tiny_model(tmp_path / "tiny", "llama", layers=2, hidden=64, dtype=torch.bfloat16)
    out = tmp_path / "out"
    quantize_mixed(model, out, calibration, 5.5, monkeypatch)
    layers = json.loads((out / "lowbit_manifest.json").read_text())["layers"]
    arch = architecture_of(json.loads((out / "config.json").read_text()))
    for i in range(arch.num_layers):
        attention = {layers[arch.layer_prefix(i) + n]["update_share"] for g in arch.groups[:2] for n in g}
        mlp = {layers[arch.layer_prefix(i) + n]["update_share"] for g in arch.groups[2:] for n in g}
        assert len(attention) == 1 and len(mlp) == 1 and attention != mlp
        assert all(0 < s < 4 for s in attention | mlp)

    settings = QuantizeSettings(method="gptq", bits=4, group_size=64, target_bpw=5.5)
    stats = layers[arch.layer_prefix(0) + arch.groups[0][0]]  # q_proj, 64 x 64
    relative, update = (score_of(settings, 64, 64, 2, stats, w).errors for w in ("relative", "update"))
    assert relative.keys() == update.keys()
    assert all(update[f] == pytest.approx(stats["update_share"] * relative[f]) for f in relative)
    with pytest.raises(ValueError, match="weighting"):
        score_of(settings, 64, 64, 2, stats, "residual")


# ---- per-token errors ----

def naive_token_error(weight, dequantized, rows) -> float:
    ratios = [float(((weight - dequantized) @ x).square().sum() / (weight @ x).square().sum()) for x in rows]
    return sum(ratios) / len(ratios)


def test_a_per_token_error_counts_every_token_alike_where_a_massive_token_sets_the_all_token_error():
    from lowbit.quantize.solve import relative_output_error, relative_token_error

    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    dequantized = weight + 0.05 * torch.randn(32, 64)
    rows = torch.randn(200, 64)
    rows[0] *= 1e3  # a token with massive activations
    token = relative_token_error(weight, dequantized, rows, chunk_rows=7)  # chunks that do not divide the rows
    assert token == pytest.approx(naive_token_error(weight, dequantized, rows), rel=1e-4)
    assert token == pytest.approx(relative_token_error(weight, dequantized, rows), rel=1e-6)
    all_tokens = relative_output_error(weight, dequantized, rows.T @ rows)
    massive_alone = naive_token_error(weight, dequantized, rows[:1])
    assert all_tokens == pytest.approx(massive_alone, rel=0.01)  # one token of 200 sets it
    assert token == pytest.approx(naive_token_error(weight, dequantized, rows[1:]), rel=0.05)


def test_a_hessian_keeps_its_first_input_rows_as_its_sample_and_the_same_sum():
    from lowbit.quantize.solve import HessianAccumulator

    torch.manual_seed(0)
    batches = [torch.randn(n, 48) for n in (30, 30, 30)]
    sampled, plain = HessianAccumulator(48, torch.device("cpu"), 45), HessianAccumulator(48, torch.device("cpu"))
    for x in batches:
        sampled.add(x)
        plain.add(x)
        x.zero_()  # the hook's tensor is reused by the next window: the sample must be a copy
    assert plain.sample() is None
    assert torch.equal(sampled.mean(), plain.mean())
    torch.manual_seed(0)
    expected = torch.cat([torch.randn(n, 48) for n in (30, 30, 30)])[:45]
    assert torch.equal(sampled.sample(), expected)


def test_a_budget_run_scores_every_format_by_its_per_token_error_on_the_groups_first_rows(
        tmp_path, calibration, monkeypatch):
    from lowbit.quantize.mixed import score_of

    seen = {}
    solve_linear = driver._solve_linear

    def record(layer, name, solve, source_tensors, hessian, consume_hessian=False, scale=None, sample=None):
        seen[name] = (source_tensors[name + ".weight"].float().clone(), sample.clone())
        return solve_linear(layer, name, solve, source_tensors, hessian, consume_hessian, scale, sample)

    monkeypatch.setattr(driver, "_solve_linear", record)
    model = save_tiny_model(tmp_path / "tiny", "llama", layers=1, hidden=64, dtype=torch.bfloat16)
    out = tmp_path / "out"
    produced = quantize_mixed(model, out, calibration, 5.5, monkeypatch)
    layers = json.loads((out / "lowbit_manifest.json").read_text())["layers"]
    settings = QuantizeSettings(method="gptq", bits=4, group_size=64, target_bpw=5.5)
    for module, formats in produced.items():
        stats, (weight, sample) = layers[module], seen[module.split(".layers.0.", 1)[1]]
        assert sample.shape[0] == 4 * 32  # every calibration token: fewer than the sample's 4096 rows
        assert set(stats["token_errors"]) == {fmt.tag for fmt in formats}
        for fmt, dequantized in formats.items():
            assert stats["token_errors"][fmt.tag] == pytest.approx(
                naive_token_error(weight, dequantized.float(), sample), rel=1e-3)
        n, k = weight.shape
        errors = score_of(settings, n, k, 2, stats, "relative").errors
        assert all(errors[fmt] == stats["token_errors"][fmt.tag] for fmt in formats)


# ---- the "weights" weighting (the default) ----

def test_the_weights_weighting_ranks_upgrades_by_relative_error_cut_per_extra_bit_whatever_the_size():
    """Two Linears with the same relative errors in every format, one 16x the other's size: under "relative"
    the small one's upgrade is 16x cheaper a unit of error, so the greedy takes it first; under "weights" both
    cut the same relative error per extra bit per weight, and the large one counts 16x."""
    from lowbit.quantize.mixed import DEFAULT_WEIGHTING, score_of, unit_of

    settings = QuantizeSettings(method="gptq", bits=4, group_size=128, target_bpw=5.0)
    stats = {"error": 0.01, "candidates": {"4g64": 0.008, "4g32": 0.007, "8g128": 0.0005}, "update_share": 0.5}
    shapes = {"small": (256, 256), "large": (1024, 1024)}
    for weighting in ("relative", "weights"):
        scores = {name: score_of(settings, n, k, 2, stats, weighting) for name, (n, k) in shapes.items()}
        assert scores["small"].bytes.keys() == scores["large"].bytes.keys()
        ratio = scores["large"].errors[LinearFormat(4, 128)] / scores["small"].errors[LinearFormat(4, 128)]
        assert ratio == pytest.approx(16 if weighting == "weights" else 1)
        units = [unit_of((name,), [score], LinearFormat(4, 128)) for name, score in scores.items()]
        step = {u.modules[0]: (u.options[0].error - u.options[1].error) / (u.options[1].bytes - u.options[0].bytes)
                for u in units}
        if weighting == "weights":
            assert step["large"] == pytest.approx(step["small"], rel=0.02)  # bytes scale with weights, up to rounding
        else:
            assert step["small"] > 10 * step["large"]
    assert DEFAULT_WEIGHTING == "weights"
    plain = score_of(settings, 256, 256, 2, stats, "relative").errors
    weighted = score_of(settings, 256, 256, 2, stats, "weights").errors
    assert all(weighted[f] == pytest.approx(256 * 256 * plain[f]) for f in plain)
