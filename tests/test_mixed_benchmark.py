"""benchmarks/mixed.py names its cached solves, checkpoints and records by the windows they were made from: a
run whose windows begin with a BOS must never reuse one made from plain windows (the figures before 2026-12-06)."""

from __future__ import annotations

from argparse import Namespace

from benchmarks.mixed import peer_rules, run_stem, use_more_bits


def _args(no_bos: bool, calibration_seed: int = 0, **solver) -> Namespace:
    return Namespace(nsamples=64, seqlen=512, no_bos=no_bos, no_scale_search=False, no_awq_scales=False,
                     calibration_seed=calibration_seed, **solver)


def test_bos_first_runs_are_named_apart_where_the_tokenizer_adds_a_bos(gemma3_dir):
    assert run_stem(gemma3_dir, _args(no_bos=False)) == "64x512-bos"
    assert run_stem(gemma3_dir, _args(no_bos=True)) == "64x512"


def test_a_tokenizer_without_start_tokens_keeps_its_earlier_names(smollm2_dir):
    """SmolLM2's windows are the same with or without --no-bos, so its records made before still count."""
    assert run_stem(smollm2_dir, _args(no_bos=False)) == run_stem(smollm2_dir, _args(no_bos=True)) == "64x512"


def test_another_calibration_sample_is_named_apart_and_seed_0_keeps_the_earlier_names(gemma3_dir):
    assert run_stem(gemma3_dir, _args(no_bos=False, calibration_seed=1)) == "64x512-seed1-bos"
    assert run_stem(gemma3_dir, _args(no_bos=False, calibration_seed=0)) == "64x512-bos"


def test_the_vllm_form_of_llama_cpp_rule_promotes_whole_qkv_groups_where_the_rule_promotes_v(smollm2_dir):
    """Rule b promotes v_proj alone, which vLLM refuses (it fuses q/k/v); rule c is the same layers with the whole
    group, so a budget compared with it is compared with a checkpoint vLLM loads."""
    from lowbit.quantize.arch import architecture_of
    from lowbit.quantize.pack import LinearFormat
    from lowbit.quantize.checkpoint import load_config_dict

    arch = architecture_of(load_config_dict(smollm2_dir))
    rules = peer_rules(arch, LinearFormat(8, 64))
    rule_b, rule_c = rules["rule b: llama.cpp Q4_K_M v/down 8-bit"], rules["rule c: llama.cpp's layers, q/k/v + down 8-bit"]
    promoted = [i for i in range(arch.num_layers) if use_more_bits(i, arch.num_layers)]
    assert 0 < len(promoted) < arch.num_layers
    for i in range(arch.num_layers):
        prefix = arch.layer_prefix(i)
        qkv = {prefix + name for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
        in_c = {name for name in rule_c if name.startswith(prefix)}
        in_b = {name for name in rule_b if name.startswith(prefix)}
        if i in promoted:
            assert in_b == {prefix + "self_attn.v_proj", prefix + "mlp.down_proj"}
            assert in_c == qkv | {prefix + "mlp.down_proj"}
        else:
            assert not in_b and not in_c


def test_verdicts_judge_each_rule_that_ran_against_the_budget_at_its_size():
    """Rules read off the rows that were scored (rule b left out, as a run of a subset), each against the budget of
    the same size, by the variant names the runs are filed under."""
    from benchmarks.mixed import budget_at_rule_label, verdicts

    def row(delta: float, kld: float, same_top: float) -> dict:
        return {"ppl_delta": delta, "kld": {"mean": kld}, "same_top": same_top}

    rule_a, rule_c = "rule a: first + last layers 8-bit", "rule c: llama.cpp's layers, q/k/v + down 8-bit"
    scores = {"uniform 4-bit": row(4.0, 0.20, 0.70),
              "budget +0.25 bpw (weights)": row(2.8, 0.14, 0.75),
              rule_a: row(3.0, 0.16, 0.74), budget_at_rule_label(rule_a, "weights"): row(2.9, 0.15, 0.73),
              rule_c: row(2.0, 0.10, 0.80), budget_at_rule_label(rule_c, "weights"): row(2.5, 0.12, 0.78)}
    lines = verdicts(scores)
    assert lines[0] == "- +0.25 bpw (weights): delta 0.70x, KLD 0.70x uniform's: target (both <= 0.75x) met."
    assert [line.split(":")[0] for line in lines[1:]] == ["- at rule a's size (weights)", "- at rule c's size (weights)"]
    assert lines[1].endswith("the budget is better on delta, KLD.")
    assert lines[2].endswith("the budget is better on nothing.")
