"""lowbit.evals.report: gates, tables and the manifest's "eval" entry, on hand-made reports."""

import io
import json

import pytest
from rich.console import Console

from lowbit.evals.report import Gates, attach_to_manifest, check_gates, report_markdown, report_table
from lowbit.errors import CorruptInputError, UsageError

REPORT = {
    "ppl_base": 10.0,
    "ppl_quantized": 10.5,
    "ppl_delta": 0.5,
    "ppl_ratio": 1.05,
    "mean_log_ppl_ratio": 0.04879,
    "kld": {"mean": 0.02, "median": 0.01, "p99": 0.2, "p999": 0.5, "max": 1.25},
    "same_top": 0.9,
    "delta_p": {"mean": -0.003, "rms": 0.04},
    "tokens": 6141,
    "base": "org/base",
    "dataset": "wikitext2",
    "dataset_sha256": "ab" * 32,
    "protocol": "gptq-wikitext2 (rows joined by \\n\\n)",
    "windows": 3,
    "seqlen": 2048,
    "scoring": "position t predicts token t+1",
    "seconds": 12.5,
    "peak_host_bytes": 3 * 2**30,
    "peak_gpu_bytes": None,
    "contamination": None,
}

# (gate, a limit the report meets, a limit it fails, what the failure line must show)
GATE_CASES = [
    ("max_ppl_delta", 0.6, 0.4, "0.5"),
    ("max_ppl_ratio", 1.1, 1.01, "1.05"),
    ("max_kld", 0.05, 0.01, "0.02"),
    ("min_same_top", 0.8, 0.95, "0.9"),
]


def test_no_gates_means_no_failures():
    assert check_gates(REPORT, Gates()) == []


@pytest.mark.parametrize("gate, passing, failing, shown", GATE_CASES)
def test_each_gate_passes_and_fails(gate, passing, failing, shown):
    assert check_gates(REPORT, Gates(**{gate: passing})) == []
    failures = check_gates(REPORT, Gates(**{gate: failing}))
    assert len(failures) == 1
    assert gate in failures[0] and shown in failures[0] and f"{failing:g}" in failures[0]


@pytest.mark.parametrize("gate, figure", [("max_ppl_delta", 0.5), ("max_ppl_ratio", 1.05), ("max_kld", 0.02),
                                          ("min_same_top", 0.9)])
def test_a_figure_equal_to_its_limit_passes(gate, figure):
    assert check_gates(REPORT, Gates(**{gate: figure})) == []


def test_every_failed_gate_gets_a_line():
    gates = Gates(**{gate: failing for gate, _, failing, _ in GATE_CASES})
    failures = check_gates(REPORT, gates)
    assert [line.split(":")[0] for line in failures] == [gate for gate, *_ in GATE_CASES]


@pytest.mark.parametrize("gate", [gate for gate, *_ in GATE_CASES])
def test_nan_figures_fail(gate):
    nan = float("nan")
    report = {**REPORT, "ppl_delta": nan, "ppl_ratio": nan, "kld": {"mean": nan}, "same_top": nan}
    assert len(check_gates(report, Gates(**{gate: 1e9 if gate.startswith("max") else -1e9}))) == 1


@pytest.mark.parametrize("gate", [gate for gate, *_ in GATE_CASES])
def test_gates_fail_on_a_single_model_report(gate):
    failures = check_gates({"ppl": 12.0, "tokens": 100}, Gates(**{gate: 1.0}))
    assert len(failures) == 1 and "base model" in failures[0]


def test_markdown_table_holds_the_figures():
    markdown = report_markdown(REPORT)
    lines = markdown.splitlines()
    assert lines[:2] == ["| metric | value |", "|---|---|"]
    assert all(line.startswith("| ") and line.endswith(" |") and line.count(" | ") == 1 for line in lines[2:])
    for row in ("| Perplexity, base | 10.0000 |", "| Perplexity delta | +0.5000 |", "| KL divergence, mean | 0.02000 |",
                "| Same top token | 90.00% |", "| Tokens scored | 6,141 |", "| Windows x sequence length | 3 x 2048 |",
                "| Peak host memory | 3.00 GiB |", "| Seconds | 12.5 |"):
        assert row in lines
    assert "overlap" not in markdown and "GPU" not in markdown  # figures the report lacks get no row


def test_markdown_warns_of_contamination():
    contaminated = {"overlap_rate": 0.4, "contaminated": True}
    warned = report_markdown({**REPORT, "contamination": contaminated})
    assert "Warning" in warned and "40.00%" in warned
    clean = report_markdown({**REPORT, "contamination": {"overlap_rate": 0.0, "contaminated": False}})
    assert "Warning" not in clean and "do not overlap" in clean


def test_single_model_markdown_has_perplexity_only():
    markdown = report_markdown({"ppl": 12.3456, "tokens": 100, "windows": 1, "seqlen": 101})
    assert "| Perplexity | 12.3456 |" in markdown
    assert "KL divergence" not in markdown and "base" not in markdown


def test_table_renders_the_figures():
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(report_table({**REPORT, "contamination": {"overlap_rate": 0.4, "contaminated": True}}))
    text = console.file.getvalue()
    for value in ("10.5000", "+0.5000", "0.02000", "90.00%", "org/base", "Warning"):
        assert value in text


def test_attach_to_manifest_writes_the_report_and_keeps_the_rest(tmp_path):
    manifest = {"format": "lowbit-manifest", "version": 1, "files": {"a.safetensors": {"sha256": "x", "size": 1}},
                "eval": None}
    (tmp_path / "lowbit_manifest.json").write_text(json.dumps(manifest))
    attach_to_manifest(tmp_path, REPORT)
    written = json.loads((tmp_path / "lowbit_manifest.json").read_text())
    assert {k: v for k, v in written.items() if k != "eval"} == {k: v for k, v in manifest.items() if k != "eval"}
    assert written["eval"] == {**REPORT, "markdown": report_markdown(REPORT)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lowbit_manifest.json"]  # no temporary file left

    attach_to_manifest(tmp_path, {**REPORT, "ppl_quantized": 11.0})  # a later evaluation replaces the earlier one
    assert json.loads((tmp_path / "lowbit_manifest.json").read_text())["eval"]["ppl_quantized"] == 11.0


def test_attach_to_manifest_needs_a_readable_manifest(tmp_path):
    with pytest.raises(UsageError, match="lowbit_manifest.json"):
        attach_to_manifest(tmp_path, REPORT)
    (tmp_path / "lowbit_manifest.json").write_text("{not json")
    with pytest.raises(CorruptInputError):
        attach_to_manifest(tmp_path, REPORT)
