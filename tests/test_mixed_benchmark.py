"""benchmarks/mixed.py names its cached solves, checkpoints and records by the windows they were made from: a
run whose windows begin with a BOS must never reuse one made from plain windows (the figures before 2026-12-06)."""

from __future__ import annotations

from argparse import Namespace

from benchmarks.mixed import run_stem


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
