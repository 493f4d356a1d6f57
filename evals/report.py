"""What `lowbit eval` shows and keeps: gates, a terminal table, a Markdown table, the manifest's "eval".

A report is the plain dict `evals.evaluate.evaluate` returns. Comparison
figures (ppl_delta, kld, same_top, ...) exist only when a base model was
evaluated; a single model's report has "ppl" instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from lowbit.manifest import update_manifest


@dataclass(frozen=True)
class Gates:
    """Limits a report must meet; None leaves a figure unchecked. KLD is the mean per-token KLD."""

    max_ppl_delta: float | None = None
    max_ppl_ratio: float | None = None
    max_kld: float | None = None
    min_same_top: float | None = None


def check_gates(report: dict, gates: Gates) -> list[str]:
    """One line per failed gate, with the figure and the limit; [] when every gate set passes.

    A gate fails when its figure is missing (no base model was evaluated) or NaN.
    """
    kld_mean = (report.get("kld") or {}).get("mean")
    checks = [  # (gate name, limit, figure name, figure, is an upper limit)
        ("max_ppl_delta", gates.max_ppl_delta, "perplexity delta", report.get("ppl_delta"), True),
        ("max_ppl_ratio", gates.max_ppl_ratio, "perplexity ratio", report.get("ppl_ratio"), True),
        ("max_kld", gates.max_kld, "mean KLD", kld_mean, True),
        ("min_same_top", gates.min_same_top, "same top token rate", report.get("same_top"), False),
    ]
    failures = []
    for gate, limit, figure, value, upper in checks:
        if limit is None:
            continue
        if not _is_number(value):
            failures.append(f"{gate} {limit:g}: the report has no {figure} (evaluate against a base model)")
        elif upper and not value <= limit:  # written so that NaN fails
            failures.append(f"{gate}: {figure} {value:.6g} is above {limit:g}{_ppl_context(report)}")
        elif not upper and not value >= limit:
            failures.append(f"{gate}: {figure} {value:.6g} is below {limit:g}")
    return failures


def _ppl_context(report: dict) -> str:
    base, quantized = report.get("ppl_base"), report.get("ppl_quantized")
    if _is_number(base) and _is_number(quantized):
        return f" (perplexity {base:.4f} -> {quantized:.4f})"
    return ""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value, spec: str) -> str | None:
    return format(value, spec) if _is_number(value) else None


def report_rows(report: dict) -> list[tuple[str, str]]:
    """(metric, value) rows of the figures the report has, in reading order."""
    kld = report.get("kld") or {}
    delta_p = report.get("delta_p") or {}
    rows = [
        ("Perplexity", _fmt(report.get("ppl"), ".4f")),
        ("Perplexity, base", _fmt(report.get("ppl_base"), ".4f")),
        ("Perplexity, quantized", _fmt(report.get("ppl_quantized"), ".4f")),
        ("Perplexity delta", _fmt(report.get("ppl_delta"), "+.4f")),
        ("Perplexity ratio", _fmt(report.get("ppl_ratio"), ".4f")),
        ("Mean ln(PPL(Q)/PPL(base))", _fmt(report.get("mean_log_ppl_ratio"), ".5f")),
        ("KL divergence, mean", _fmt(kld.get("mean"), ".5f")),
        ("KL divergence, median", _fmt(kld.get("median"), ".5f")),
        ("KL divergence, p99", _fmt(kld.get("p99"), ".5f")),
        ("KL divergence, p99.9", _fmt(kld.get("p999"), ".5f")),
        ("KL divergence, max", _fmt(kld.get("max"), ".4f")),
        ("Same top token", _fmt(report.get("same_top"), ".2%")),
        ("Delta p, mean", _fmt(delta_p.get("mean"), "+.5f")),
        ("Delta p, RMS", _fmt(delta_p.get("rms"), ".5f")),
        ("Tokens scored", _fmt(report.get("tokens"), ",")),
        ("Windows x sequence length", _windows(report)),
        ("Base model", _text(report.get("base"))),
        ("Dataset", _text(report.get("dataset"))),
        ("Dataset sha256", _text(report.get("dataset_sha256"))),
        ("Protocol", _text(report.get("protocol"))),
        ("Scoring", _text(report.get("scoring"))),
        ("Seconds", _fmt(report.get("seconds"), ".1f")),
        ("Peak host memory", _gib(report.get("peak_host_bytes"))),
        ("Peak GPU memory", _gib(report.get("peak_gpu_bytes"))),
    ]
    return [(metric, value) for metric, value in rows if value is not None]


def _windows(report: dict) -> str | None:
    windows, seqlen = report.get("windows"), report.get("seqlen")
    return f"{windows} x {seqlen}" if windows is not None and seqlen is not None else None


def _gib(value) -> str | None:
    return f"{value / 2**30:.2f} GiB" if _is_number(value) else None


def _text(value) -> str | None:
    return None if value is None or value == "" else str(value)


def contamination_line(report: dict) -> str | None:
    contamination = report.get("contamination")
    if not isinstance(contamination, dict):
        return None
    rate = contamination.get("overlap_rate")
    n = contamination.get("n", 13)
    rate_text = f" ({rate:.2%} of the calibration {n}-grams occur in it)" if _is_number(rate) else ""
    if contamination.get("contaminated"):
        return (f"Warning: the calibration data overlaps the evaluation text{rate_text}; "
                "the perplexity delta is flattered.")
    return f"Calibration and evaluation data do not overlap{rate_text}."


def report_table(report: dict) -> Table:
    table = Table(title="lowbit eval", caption=contamination_line(report))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric, value in report_rows(report):
        table.add_row(metric, value)
    return table


def report_markdown(report: dict) -> str:
    """A Markdown table of the figures (no heading: the model card puts it under its own)."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {metric} | {_markdown_cell(value)} |" for metric, value in report_rows(report)]
    contamination = contamination_line(report)
    if contamination is not None:
        lines += ["", f"**{contamination}**" if report["contamination"].get("contaminated") else contamination]
    return "\n".join(lines) + "\n"


def _markdown_cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def attach_to_manifest(quantized: Path, report: dict) -> None:
    """Store the report, with its Markdown table, as the manifest's "eval" (temporary file renamed into place).

    The manifest lists no checksum of itself, so no other entry changes.
    """
    update_manifest(quantized, "eval", {**report, "markdown": report_markdown(report)})
