"""The quality grid over several calibration samples: mean perplexity deltas, and the issue's ratios of them.

    python benchmarks/quality_seeds.py --models gemma3 --configs 4g128 \\
        --methods gptq-default,gptq-exact,llmc-default,llmc-imatrix --seeds 0,1,2,3

On Gemma-3-270M at 4 bits, one calibration sample moves a method's perplexity delta by about a tenth, both
tools alike: two runs that differ only in float rounding differ as much. One sample then decides a ratio
target by chance. This runs benchmarks/quality.py's grid once per calibration seed (each seed draws other
64 x 512 c4 windows, which both tools get; the wikitext-2 evaluation windows stay the same), reusing its
cache, and reports each method's delta per seed and over all seeds. The ratios are of mean deltas.
llm-compressor's best configuration is the one with the lowest mean delta over the seeds, not the best of
each seed, which would pick the peer's luckiest draw.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import quality  # noqa: E402
from benchmarks.markdown import replace_section  # noqa: E402
from benchmarks.peer_llmcompressor import PEER_BEST_CANDIDATES  # noqa: E402
from benchmarks.quality_report import LABELS, TARGETS  # noqa: E402


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated calibration seeds")
    parser.add_argument("--section", default="quality-seeds", help="the BENCHMARKS.md section to write")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ours, rest = parser.parse_known_args(argv)
    ours.seeds = [int(seed) for seed in ours.seeds.split(",")]
    return ours, rest


def deltas_by_seed(seeds: list[int], grid_argv: list[str]) -> tuple[dict, argparse.Namespace]:
    """{model: {config: {method: {seed: delta}}}} and the grid's arguments. One source revision for every seed:
    the grid is prepared once, then run with each seed in turn."""
    table: dict = {}
    args = quality.parse_args([*grid_argv, "--no-write"])
    quality.prepare(args)
    for seed in seeds:
        args.calibration_seed = seed
        for model, per_model in quality.grid(args).items():
            base = per_model.get("base", {}).get("ppl")
            for config, cells in per_model.items():
                if config == "base" or base is None:
                    continue
                for method, result in cells.items():
                    if "ppl" in result:
                        table.setdefault(model, {}).setdefault(config, {}).setdefault(method, {})[seed] = (
                            result["ppl"] - base)
    return table, args


def mean(values: dict[int, float]) -> float:
    return statistics.fmean(values.values())


def best_peer(methods: dict, seeds: list[int]) -> str | None:
    """llm-compressor's configuration with the lowest mean delta over the seeds that all of them cover."""
    complete = [m for m in PEER_BEST_CANDIDATES if set(methods.get(m, {})) >= set(seeds)]
    return min(complete, key=lambda m: mean(methods[m])) if complete else None


def section_text(table: dict, seeds: list[int], order: list[str] = ()) -> str:
    """One table per model and configuration, its methods in `order` (the command's) where given."""
    lines = []
    for model, per_model in table.items():
        for config, methods in per_model.items():
            methods = dict(sorted(methods.items(), key=lambda item: list(order).index(item[0])
                                  if item[0] in order else len(order)))
            lines += [f"### {model}, {config}", "",
                      "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean delta | sd |",
                      "|---|" + "---|" * (len(seeds) + 2)]
            for method, per_seed in methods.items():
                cells = [f"{per_seed[s]:+.3f}" if s in per_seed else "" for s in seeds]
                spread = statistics.stdev(per_seed.values()) if len(per_seed) > 1 else 0.0
                lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells)
                             + f" | {mean(per_seed):+.3f} | {spread:.3f} |")
            lines += ["", *ratio_lines(methods, seeds, config), ""]
    return "\n".join(lines)


def ratio_lines(methods: dict, seeds: list[int], config: str) -> list[str]:
    """Each lowbit method's mean delta over llm-compressor's default's and its best configuration's."""
    default, best = methods.get("llmc-default"), best_peer(methods, seeds)
    if not default or set(default) < set(seeds):
        return ["- llm-compressor's default is not measured on every seed: no ratios."]
    bound_default, bound_best = TARGETS.get(config[0], (None, None))
    lines = []
    for method, per_seed in methods.items():
        if method.startswith("llmc"):
            continue
        if set(per_seed) < set(seeds):
            lines.append(f"- {LABELS.get(method, method)}: not measured on every seed, no ratio")
            continue
        text = f"- {LABELS.get(method, method)}: {mean(per_seed) / mean(default):.3f}x llm-compressor's default"
        if best:
            text += f", {mean(per_seed) / mean(methods[best]):.3f}x its best ({best})"
        if method == "gptq-default" and bound_default:
            per = ", ".join(f"{per_seed[s] / default[s]:.2f}x" for s in seeds)
            text += f"; per seed against the default: {per} (targets: <= {bound_default}x"
            text += f" and <= {bound_best}x)" if bound_best else ")"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> None:
    ours, grid_argv = parse_args(argv)
    started = time.time()
    table, args = deltas_by_seed(ours.seeds, grid_argv)
    command = "python benchmarks/quality_seeds.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = (f"Calibration: `{args.calibration}`, {args.nsamples} x {args.seqlen} tokens per seed, one sample per "
            f"seed, both tools given the same; evaluation: wikitext-2, {args.eval_windows} x {args.eval_seqlen}, "
            "the same windows for every seed. delta: perplexity minus the base's, by benchmarks/quality.py's "
            "plain transformers perplexity; each cell from its cache where an earlier run made it.\n\n"
            + section_text(table, ours.seeds, args.methods)
            + f"\nWhole run: {(time.time() - started) / 60:.1f} min. Produced by: `{command.strip()}`")
    print(text)
    if not ours.no_write:
        replace_section(REPO / "BENCHMARKS.md", ours.section,
                        f"Quality over {len(ours.seeds)} calibration samples ({ours.section})", text)


if __name__ == "__main__":
    main()
