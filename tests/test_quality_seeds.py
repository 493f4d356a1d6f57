"""benchmarks/quality_seeds.py: ratios of mean deltas over calibration samples, and a best peer configuration
chosen by its mean, never by its luckiest sample."""

from __future__ import annotations

import pytest

from benchmarks.quality_seeds import best_peer, ratio_lines, section_text

SEEDS = [0, 1, 2]


def test_the_peers_best_configuration_is_the_lowest_mean_not_the_luckiest_seed():
    methods = {"llmc-default": {0: 5.0, 1: 5.0, 2: 5.0},
               "llmc-mse": {0: 3.0, 1: 6.0, 2: 6.0},  # the best single sample, a worse mean
               "llmc-imatrix": {0: 4.0, 1: 4.5, 2: 4.0}}
    assert best_peer(methods, SEEDS) == "llmc-imatrix"


def test_a_configuration_missing_a_seed_is_not_a_candidate_for_best():
    methods = {"llmc-default": {0: 5.0, 1: 5.0, 2: 5.0}, "llmc-imatrix": {0: 1.0, 1: 1.0}}
    assert best_peer(methods, SEEDS) == "llmc-default"


def test_ratios_are_of_mean_deltas_with_each_seeds_ratio_beside_them():
    methods = {"gptq-default": {0: 3.0, 1: 4.0, 2: 5.0},
               "llmc-default": {0: 5.0, 1: 6.0, 2: 7.0},
               "llmc-imatrix": {0: 4.0, 1: 5.0, 2: 6.0}}
    (line,) = ratio_lines(methods, SEEDS, "4g128")
    assert "0.667x llm-compressor's default" in line  # 4 / 6, not the mean of 3/5, 4/6, 5/7 (0.659)
    assert "0.800x its best (llmc-imatrix)" in line
    assert "0.60x, 0.67x, 0.71x" in line and "<= 0.7x" in line and "<= 0.9x" in line


def test_a_method_missing_a_seed_gets_no_ratio_and_no_peer_default_means_no_ratios():
    methods = {"gptq-default": {0: 3.0, 1: 4.0}, "llmc-default": {0: 5.0, 1: 6.0, 2: 7.0}}
    assert ratio_lines(methods, SEEDS, "4g128") == ["- GPTQ, lowbit's defaults: not measured on every seed, no ratio"]
    assert "no ratios" in ratio_lines({"gptq-default": {0: 3.0, 1: 4.0, 2: 5.0}}, SEEDS, "4g128")[0]


def test_the_table_shows_each_seed_the_mean_and_the_spread():
    table = {"gemma3": {"4g128": {"gptq-default": {0: 3.0, 1: 4.0, 2: 5.0},
                                  "llmc-default": {0: 5.0, 1: 6.0, 2: 7.0}}}}
    text = section_text(table, SEEDS)
    row = next(line for line in text.splitlines() if line.startswith("| GPTQ, lowbit's defaults"))
    assert row.split(" | ")[1:4] == ["+3.000", "+4.000", "+5.000"]
    assert "+4.000" in row.split(" | ")[4] and row.rstrip(" |").endswith("1.000")
    assert "### gemma3, 4g128" in text


def test_the_table_follows_the_commands_order_of_methods():
    table = {"gemma3": {"4g128": {"llmc-default": {0: 5.0}, "gptq-default": {0: 3.0}}}}
    rows = [line for line in section_text(table, [0], ["gptq-default", "llmc-default"]).splitlines()
            if line.startswith("| ") and "seed" not in line]
    assert rows[0].startswith("| GPTQ, lowbit's defaults") and rows[1].startswith("| llm-compressor")


@pytest.mark.parametrize("config, bound", [("3g64", "<= 0.6x)"), ("4g64", "<= 0.9x)")])
def test_the_targets_follow_the_bits(config, bound):
    methods = {"gptq-default": {0: 3.0, 1: 4.0, 2: 5.0}, "llmc-default": {0: 5.0, 1: 6.0, 2: 7.0}}
    assert ratio_lines(methods, SEEDS, config)[0].endswith(bound)
