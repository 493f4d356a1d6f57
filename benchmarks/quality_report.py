"""The BENCHMARKS.md text of benchmarks/quality.py: quality tables, the speed table, what llm-compressor applied."""

from __future__ import annotations

import torch

from benchmarks.peer_llmcompressor import LLMC_VERSION, PEER_BEST_CANDIDATES, STARTING_ENVIRONMENT

LABELS = {
    "rtn": "RTN", "rtn-ss": "RTN + scale search", "rtn-ss-awq": "RTN + scale search + AWQ input scales",
    "gptq": "GPTQ", "gptq-ss": "GPTQ + scale search",
    "gptq-ss-ao": "GPTQ + scale search + act-order (static groups): the defaults before AWQ scales",
    "gptq-default": "GPTQ, lowbit's defaults",
    "gptq-asym": "GPTQ, lowbit's defaults + asymmetric grid (--asym)",
    "gptq-sym": "GPTQ, lowbit's defaults + symmetric grid (--sym)",
    "gptq-no-awq": "GPTQ, lowbit's defaults without AWQ input scales (--no-awq-scales)",
    "gptq-no-ss": "GPTQ, lowbit's defaults without scale search (--no-scale-search)",
    "gptq-dynamic": "GPTQ, lowbit's defaults with groups in sweep order (--no-static-groups: desc_act true)",
    "gptq-no-ao": "GPTQ, lowbit's defaults without act-order (--no-act-order)",
    "gptq-exact": "GPTQ, lowbit's defaults in full float32 matmuls (--exact-matmul)",
    "gptq-fp": "GPTQ, lowbit's defaults + fit towards the unquantized outputs (--fp-targets)",
    "gptq-no-fp": "GPTQ, lowbit's defaults, each Linear fit to its own inputs only (--no-fp-targets)",
    "nf4": "NF4", "nf4-cal": "NF4 calibrated", "nf4-cal-ss": "NF4 calibrated + scale search",
    "nf4-cal-ao": "NF4 calibrated + scale search + act-order, each Linear fit to its own inputs (--no-fp-targets)",
    "nf4-cal-fp": "NF4 calibrated, lowbit's defaults: scale search, act-order, fit towards the unquantized outputs",
    "llmc-default": "llm-compressor GPTQ, defaults", "llmc-noact": "llm-compressor GPTQ, actorder=None",
    "llmc-mse": "llm-compressor GPTQ, mse observer", "llmc-imatrix": "llm-compressor GPTQ, imatrix_mse observer",
    "llmc-fastmm": "llm-compressor GPTQ, defaults, float32 matmuls at torch's \"medium\" precision",
    "llmc-asym": "llm-compressor GPTQ, defaults + asymmetric grid (symmetric: False)",
}
# read in llm-compressor 0.14's source (llmcompressor/modifiers/gptq/, observers/); differences from lowbit's solver
PEER_SOLVER_NOTES = """llm-compressor's GPTQ, as its source runs it (and what that means next to lowbit's):
- `GPTQModifier.actorder` defaults to a sentinel that becomes `static` whenever the scheme leaves actorder
  unset, so its default run is an act-order run; only the modifier-level `actorder=None` turns it off (the
  recipe.yaml then saves `actorder: null`, see the table below).
- Group scales always come from its weight observer on the original weights, before the solver runs: static
  groups, with or without act-order (lowbit's plain GPTQ takes each group's scale from the error-updated
  weights at the group start; `--act-order --static-groups` is the like-for-like setting).
- Default weight observer: `memoryless_minmax` (plain min/max per group); `mse` searches a shrink grid on the
  unweighted error; `imatrix_mse` weights that error by each input column's mean squared activation.
- Damping: 0.01 x the mean Hessian diagonal, added to the diagonal (as lowbit's `--damp`); block size 128;
  act-order sorts columns by descending Hessian diagonal; dead columns (zero diagonal) get a diagonal of 1.
"""
# the quality issue's targets for lowbit's default GPTQ delta, by bits: at most this times llm-compressor's default's,
# and at most this times its best configuration's (None: no target)
TARGETS = {"4": (0.7, 0.9), "3": (0.6, None)}
SPEED_PAIRS = (("gptq-default", "llmc-default"), ("gptq", "llmc-default"), ("gptq", "llmc-noact"),
               ("gptq-ss-ao", "llmc-default"), ("gptq-exact", "llmc-default"), ("gptq-default", "llmc-fastmm"),
               ("gptq-asym", "llmc-asym"))


def ok(result: dict | None) -> bool:
    return bool(result) and "ppl" in result


def best_peer(cells: dict) -> str | None:
    """llm-compressor's best shipped configuration on this grid cell: the lowest perplexity of its candidates."""
    measured = [name for name in PEER_BEST_CANDIDATES if ok(cells.get(name))]
    return min(measured, key=lambda name: cells[name]["ppl"]) if measured else None


def ratio(delta: float, reference: dict | None, base_ppl: float) -> str:
    if not ok(reference) or reference["ppl"] - base_ppl <= 0:
        return ""
    return f"{delta / (reference['ppl'] - base_ppl):.2f}x"


def gib(size: int) -> str:
    return f"{size / 2**30:.2f}"


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def percent(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.1f}%"


def quality_rows(cells: dict, base_ppl: float, references: list[tuple[str, dict | None]]) -> list[str]:
    head = ["method", "PPL", "delta", *[f"delta / {name}" for name, _ in references], "same top", "KLD mean",
            "bits/weight", "quantize wall s", "CPU s", "peak RSS GiB", "eval wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| base | {base_ppl:.3f} | |" + " |" * len(references) + " | | 16 | | | | |")
    for method, result in cells.items():
        label = LABELS.get(method, method) + (" (reused)" if result.get("reused") else "")
        if not ok(result):
            reason = result.get("skipped") or f"FAILED: {result.get('failed')}"
            lines.append(f"| {label} | {reason} |" + " |" * (len(head) - 2))
            continue
        delta = result["ppl"] - base_ppl
        kld = (result.get("lowbit_eval") or {}).get("kld", {}).get("mean")
        q = result["quantize"]
        lines.append(
            f"| {label} | {result['ppl']:.3f} | {delta:+.3f} | "
            + " | ".join(ratio(delta, ref, base_ppl) for _, ref in references)
            + f" | {percent(result.get('same_top'))} | {fmt(kld, '.4f')} | "
            f"{fmt(result.get('bits_per_weight'), '.2f')} | {q['seconds']:.0f} | {q['cpu_seconds']:.0f} | "
            f"{gib(q['peak_rss_bytes'])} | {result['eval_seconds']:.0f} |")
    return lines


def target_lines(cells: dict, config: str, base_ppl: float) -> list[str]:
    """The issue's targets for lowbit's default GPTQ, read off this table."""
    ours, default, best = cells.get("gptq-default"), cells.get("llmc-default"), cells.get(best_peer(cells) or "")
    if not (ok(ours) and ok(default)):
        return []
    delta = ours["ppl"] - base_ppl
    lines = []
    bound_default, bound_best = TARGETS.get(config[0], TARGETS["3"])
    lines.append(f"- lowbit default GPTQ delta / llm-compressor default: {ratio(delta, default, base_ppl)} "
                 f"(target <= {bound_default}x)")
    if bound_best and ok(best):
        lines.append(f"- lowbit default GPTQ delta / llm-compressor best ({best_peer(cells)}): "
                     f"{ratio(delta, best, base_ppl)} (target <= {bound_best}x)")
    return lines


def speed_rows(results: dict) -> list[str]:
    lines = ["| model | config | lowbit run | wall s | CPU s | peak RSS GiB | llm-compressor run | wall s | CPU s | "
             "(oneshot s) | peak RSS GiB | wall ratio | CPU ratio | RSS ratio |", "|" + "---|" * 14]
    for model, per_model in results.items():
        for config, cells in per_model.items():
            if config in ("base", "nf4"):
                continue
            for ours, theirs in SPEED_PAIRS:
                a, b = cells.get(ours), cells.get(theirs)
                if not (ok(a) and ok(b)):
                    continue
                qa, qb = a["quantize"], b["quantize"]
                mark_a, mark_b = (" (reused)" if cell.get("reused") else "" for cell in (a, b))
                lines.append(
                    f"| {model} | {config} | {ours}{mark_a} | {qa['seconds']:.0f} | {qa['cpu_seconds']:.0f} | "
                    f"{gib(qa['peak_rss_bytes'])} | {theirs}{mark_b} | {qb['seconds']:.0f} | {qb['cpu_seconds']:.0f} | "
                    f"{b['peer_run']['oneshot_seconds']:.0f} | {gib(qb['peak_rss_bytes'])} | "
                    f"{qa['seconds'] / qb['seconds']:.2f} | {qa['cpu_seconds'] / qb['cpu_seconds']:.2f} | "
                    f"{qa['peak_rss_bytes'] / qb['peak_rss_bytes']:.2f} |")
    return lines if len(lines) > 2 else []


def applied_rows(results: dict) -> list[str]:
    lines = ["| model | config | run | recipe.yaml actorder | checkpoint actorder | observer | dampening | block |",
             "|---|---|---|---|---|---|---|---|"]
    for model, per_model in results.items():
        for config, cells in per_model.items():
            for name, result in ({} if config == "base" else cells).items():
                if not ok(result) or "peer_run" not in result:
                    continue
                applied = result["peer_run"]["applied"]
                recipe, saved = applied["recipe"], applied["checkpoint"]
                lines.append(f"| {model} | {config} | {name} | {recipe['actorder']} | {saved['actorder']} | "
                             f"{saved['observer'] or recipe['weights'].get('observer') or 'minmax (default)'} | "
                             f"{recipe['dampening_frac']} | {recipe['block_size']} |")
    return lines if len(lines) > 2 else []


def openmp_environment() -> str:
    """The OpenMP variables every child started with (peer_llmcompressor.STARTING_ENVIRONMENT)."""
    chosen = {k: v for k, v in STARTING_ENVIRONMENT.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}
    return ", ".join(f"{k}={v}" for k, v in sorted(chosen.items())) or "no OpenMP variable set"


def markdown(results: dict, args, command: str, seconds: float) -> str:
    lines = [
        f"CPU, {torch.get_num_threads()} threads, float32 compute for both tools. Calibration: `{args.calibration}`, "
        f"{args.nsamples} x {args.seqlen} tokens, seed {args.calibration_seed}, drawn once per model as `lowbit quantize` draws them; every "
        f"calibrated lowbit run wrote the same ids to lowbit_calibration.json, and llm-compressor {LLMC_VERSION} was "
        f"given those ids. Evaluation: wikitext-2 test, the first {args.eval_windows} windows of {args.eval_seqlen} "
        f"tokens, every model scored by the same plain transformers perplexity (lowbit's checkpoints dequantized by "
        f"quantize.loader, llm-compressor's decompressed by transformers). 'same top': share of positions whose "
        f"argmax matches the base's. Symmetric grids unless a row says asymmetric, damping 0.01, lm_head kept in 16-bit by both tools. Each "
        f"quantization is one child process run alone (wall, CPU, peak RSS from wait4: interpreter start to the "
        f"written checkpoint), in the environment the script was started in ({openmp_environment()}), so each "
        f"tool keeps its own OpenMP defaults; '(reused)' rows come from the cache of an earlier run of this script. "
        f"llm-compressor's best configuration is the lowest perplexity of {', '.join(PEER_BEST_CANDIDATES)} "
        f"(all with its default static act-order).",
    ]
    for model, per_model in results.items():
        base = per_model.get("base", {})
        if not ok(base):
            continue
        base_ppl = base["ppl"]
        for config, cells in per_model.items():
            if config == "base":
                continue
            if config == "nf4":
                title, references = "NF4 (bitsandbytes, blocks of 64, double quant)", [("NF4", cells.get("nf4"))]
            else:
                best = best_peer(cells)
                bits, group = config.split("g")
                title = f"{bits}-bit, group size {group}"
                references = [("llmc default", cells.get("llmc-default")), (f"llmc best ({best})", cells.get(best or ""))]
            lines += ["", f"### {model}: {title}", "", *quality_rows(cells, base_ppl, references)]
            targets = target_lines(cells, config, base_ppl)
            lines += ["", *targets] if targets else []
    speed = speed_rows(results)
    if speed:
        lines += ["", "### Speed: both tools timed in this run, one after the other, same settings and windows", "",
                  *speed]
    applied = applied_rows(results)
    if applied:
        lines += ["", "### What llm-compressor applied (read back from the recipe.yaml and config.json it saved)", "",
                  *applied]
    lines += ["", PEER_SOLVER_NOTES.strip()]
    lines += ["", f"Whole run: {seconds / 60:.1f} min. Produced by: `{command}`"]
    return "\n".join(lines)
