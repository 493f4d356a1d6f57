"""A size budget (`--target-bpw`) against uniform 4-bit and the simple rules peers use, on SmolLM2 and Gemma-3-270M.

Per model, ONE GPTQ pass over the layers scores every candidate format of every Linear and keeps its
tensors (quantize/mixed.py); every variant is then assembled from those same candidates
(assemble.write_checkpoint with its own format map), so the variants differ only in which kept tensors
they take. All are scored by lowbit's evaluator against the base on the same wikitext-2 windows.

Variants: uniform 4-bit; the budget at uniform + 0.25 and + 0.5 bits per weight; (a) the first and last
decoder layers' Linears in 8 bits; (b) llama.cpp Q4_K_M's promotion (v_proj and down_proj in the layers
its `use_more_bits` picks) in 8 bits; (c) the same with all of q/k/v where v_proj is promoted (vLLM
fuses them and refuses a checkpoint whose shards differ); and the budget at exactly each rule's size.

    nice -n 5 python benchmarks/mixed.py                     # the recorded run
    nice -n 5 python benchmarks/mixed.py --models smollm2 --nsamples 2 --seqlen 64 --eval-windows 2 --no-write  # smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LOWBIT_DATA_DIR", str(REPO.parent / "shared" / "data"))

from benchmarks.markdown import replace_section  # noqa: E402
from lowbit.calibration.windows import CalibrationConfig  # noqa: E402
from lowbit.quantize.assemble import mixed_formats, mixed_units, write_checkpoint  # noqa: E402
from lowbit.quantize.driver import QuantizeSettings, RunOptions, open_job, solve_layers  # noqa: E402
from lowbit.quantize.mixed import WEIGHTINGS, Unit, choose, format_bytes  # noqa: E402
from lowbit.quantize.pack import LinearFormat  # noqa: E402

CACHE = Path(os.environ.get("LOWBIT_TEST_CACHE", Path.home() / ".cache" / "lowbit-tests"))
MODELS = {"smollm2": (CACHE / "smollm2-135m-bf16", 64), "gemma3": (CACHE / "gemma3-270m-bf16", 128)}
SCORING_TARGET = 8.0  # any budget makes the layer loop score the candidates; the variants choose their own


def solved_job(name: str, args):
    """The model's layers solved once with every candidate kept (resumed from the progress folder when there)."""
    folder, group_size = MODELS[name]
    settings = QuantizeSettings(method="gptq", bits=4, group_size=group_size, target_bpw=SCORING_TARGET,
                                scale_search=not args.no_scale_search, awq_scales=not args.no_awq_scales)
    calibration = CalibrationConfig(source="c4", nsamples=args.nsamples, seqlen=args.seqlen, bos=not args.no_bos,
                                    seed=args.calibration_seed)
    out = args.out / name / f"candidates-{run_stem(folder, args)}"
    started = time.time()
    job = open_job(str(folder), out, settings, calibration, RunOptions(device="cpu", force=True),
                   on_progress=lambda stage, done, total: print(f"{name} {stage} {done}/{total}", flush=True))
    solve_layers(job)
    print(f"{name}: layers solved in {time.time() - started:.0f} s", flush=True)
    return job


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's `use_more_bits` (src/llama-quant.cpp), which Q4_K_M applies to attn_v and ffn_down (to Q6_K):
    the first and last eighth of the layers and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def rule_formats(arch, promote, fmt: LinearFormat) -> dict[str, LinearFormat]:
    """A peer's rule as a format map: every decoder Linear `promote(layer, name)` picks gets fmt."""
    return {arch.layer_prefix(i) + name: fmt for i in range(arch.num_layers) for name in arch.linear_names()
            if promote(i, name)}


def peer_rules(arch, fmt: LinearFormat) -> dict[str, dict[str, LinearFormat]]:
    """The simple rules peers use, as format maps giving fmt to: (a) the first and last layers' Linears; (b)
    llama.cpp Q4_K_M's v_proj and down_proj where `use_more_bits` says; (c) rule b with all of v_proj's
    projection group (q/k/v), which is how vLLM can load it: it fuses them and refuses shards that differ."""
    last = arch.num_layers - 1
    more = lambda layer: use_more_bits(layer, arch.num_layers)  # noqa: E731
    v_group = next(group for group in arch.groups if any(name.endswith("v_proj") for name in group))
    return {
        "rule a: first + last layers 8-bit": rule_formats(arch, lambda i, name: i in (0, last), fmt),
        "rule b: llama.cpp Q4_K_M v/down 8-bit": rule_formats(
            arch, lambda i, name: more(i) and name.endswith(("v_proj", "down_proj")), fmt),
        "rule c: llama.cpp's layers, q/k/v + down 8-bit": rule_formats(
            arch, lambda i, name: more(i) and (name in v_group or name.endswith("down_proj")), fmt),
    }


def coarse_formats(job, budget: int, weighting: str) -> dict:
    """The budget's choice with 8 and 16 bits as the only upgrades: no 4-bit candidate at a finer group."""
    units = [Unit(unit.modules, tuple(o for i, o in enumerate(unit.options) if i == 0 or o.fmt.bits != 4))
             for unit in mixed_units(job, weighting)]
    return {m: option.fmt for unit, option in zip(units, choose(units, budget)) for m in unit.modules}


def variants(job, weightings: list[str]) -> dict[str, tuple[dict, int]]:
    """Name -> (format map, decoder-Linear bytes) of every variant, all from the one solve's candidates."""
    arch, settings = job.arch, job.settings
    base = LinearFormat(settings.bits, settings.group_size)
    eight = LinearFormat(8, settings.group_size)
    infos = {m: job.reader.info(m + ".weight") for unit in mixed_units(job) for m in unit.modules}
    weights = sum(info.shape[0] * info.shape[1] for info in infos.values())  # as bits_per_weight counts them

    def size(formats: dict) -> int:
        return sum(format_bytes(formats.get(m, base), *info.shape, info.dtype.itemsize) for m, info in infos.items())

    uniform = size({})

    out = {"uniform 4-bit": ({}, uniform)}
    for extra in (0.25, 0.5):
        budget = uniform + int(extra * weights // 8)
        for w in weightings:
            formats = mixed_formats(job, budget, w)
            out[f"budget +{extra:g} bpw ({w})"] = (formats, size(formats))
            formats = coarse_formats(job, budget, w)
            out[f"budget +{extra:g} bpw ({w}, 8/16-bit only)"] = (formats, size(formats))
    rules = peer_rules(arch, eight)
    for name, formats in rules.items():
        out[name] = (formats, size(formats))
        for w in weightings:
            chosen = mixed_formats(job, size(formats), w)
            out[budget_at_rule_label(name, w)] = (chosen, size(chosen))
    return out


def budget_at_rule_label(rule_label: str, weighting: str) -> str:
    """The variant name of the budget at a rule's size: peer_rules' name up to its colon ("rule a"), and the weighting."""
    return f"budget at {rule_label.split(':')[0]}'s size ({weighting})"


def evaluate_variants(model: Path, folders: dict[str, Path], args) -> dict[str, dict]:
    """lowbit's evaluator: every variant against the base on the same windows (base hidden states once)."""
    from transformers import AutoTokenizer

    from lowbit.evals.datasets import eval_windows, load_eval_text
    from lowbit.evals.evaluate import EvalOptions, final_hidden_states, score
    from lowbit.quantize.loader import DenseWeights

    text, _ = load_eval_text("wikitext2")
    windows = eval_windows(text, AutoTokenizer.from_pretrained(model), args.eval_seqlen, args.eval_windows,
                           bos=not args.no_bos)
    options = EvalOptions(seqlen=args.eval_seqlen, max_windows=args.eval_windows, device="cpu", bos=not args.no_bos)
    base_hidden = final_hidden_states(model, windows, options)
    base_head = DenseWeights(model).lm_head_weight().float()
    scores = {}
    for name, folder in folders.items():
        started = time.time()
        hidden = final_hidden_states(folder, windows, options)
        scores[name] = score(base_hidden, hidden, windows, base_head, DenseWeights(folder).lm_head_weight().float())
        print(name, {k: scores[name][k] for k in ("ppl_base", "ppl_quantized", "same_top")},
              f"{time.time() - started:.0f} s", flush=True)
        del hidden
    return scores


def run_model(name: str, args) -> dict:
    """One model's figures: from its record when this script already scored it with these settings."""
    if args.variants:  # a subset: not the record of the whole set
        return score_model(name, args)
    record = args.out / name / (f"scores-{run_stem(MODELS[name][0], args)}-"
                                f"{args.eval_windows}x{args.eval_seqlen}-{args.weightings}.json")
    if record.exists() and not args.fresh:
        return json.loads(record.read_text())
    result = score_model(name, args)
    record.write_text(json.dumps(result))
    return result


def score_model(name: str, args) -> dict:
    job = solved_job(name, args)
    weightings = args.weightings.split(",")
    chosen = variants(job, weightings)
    if args.variants:
        chosen = {label: chosen[label] for label in args.variants.split(";")}
    folders = {}
    for label, (formats, size) in chosen.items():
        folder = args.out / name / f"variants-{run_stem(MODELS[name][0], args)}" / slug(label)
        if args.fresh or not (folder / "lowbit_manifest.json").exists():
            write_checkpoint(job, formats, folder, allow_split=True)
        folders[label] = folder
    scores = evaluate_variants(MODELS[name][0], folders, args)
    base = LinearFormat(job.settings.bits, job.settings.group_size)
    for label, (formats, size) in chosen.items():
        manifest = json.loads((folders[label] / "lowbit_manifest.json").read_text())
        counts = {tag: sum(1 for f in formats.values() if f != base and f.tag.startswith(tag))
                  for tag in ("8g", "4g64", "4g32", "16")}
        scores[label].update(bytes=size, bits_per_weight=manifest["bits_per_weight"], counts=counts)
    return {"scores": scores, "layers": job.arch.num_layers, "group_size": job.settings.group_size}


def solver_tag(args) -> str:
    """What in the solver's settings differs from lowbit's defaults, for the cache's file names."""
    return (("-noss" if args.no_scale_search else "") + ("-noawq" if args.no_awq_scales else "")
            + (f"-seed{args.calibration_seed}" if args.calibration_seed else ""))


def run_stem(folder: Path, args) -> str:
    """What names a run's files in the cache: its calibration windows, solver_tag, and "-bos" where the windows
    begin with the model's start tokens (none for SmolLM2, whose windows are the same either way, so its earlier
    records still count)."""
    bos = "-bos" if not args.no_bos and has_start_tokens(folder) else ""
    return f"{args.nsamples}x{args.seqlen}{solver_tag(args)}{bos}"


@functools.cache
def has_start_tokens(folder: Path) -> bool:
    """Whether the tokenizer in FOLDER puts tokens before any text (read once per model, not once per cache path)."""
    from transformers import AutoTokenizer

    from lowbit.calibration.windows import start_tokens

    return bool(start_tokens(AutoTokenizer.from_pretrained(folder)))


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def verdicts(scores: dict) -> list[str]:
    """The issue's targets read off one model's rows: +0.25 bpw at most 0.75x uniform's delta and KLD, the
    budget against each rule at the rule's size, and the two weightings against each other."""
    uniform = scores["uniform 4-bit"]

    def ratios(row):
        return row["ppl_delta"] / uniform["ppl_delta"], row["kld"]["mean"] / uniform["kld"]["mean"]

    out = []
    weightings = [label.rsplit("(", 1)[1][:-1] for label in scores
                  if label.startswith("budget +0.25") and "only" not in label]
    for w in weightings:
        delta, kld = ratios(scores[f"budget +0.25 bpw ({w})"])
        met = "met" if delta <= 0.75 and kld <= 0.75 else "NOT met"
        out.append(f"- +0.25 bpw ({w}): delta {delta:.2f}x, KLD {kld:.2f}x uniform's: target (both <= 0.75x) {met}.")
    for rule_label in [label for label in scores if label.startswith("rule ")]:  # peer_rules' names, as run
        rule, r = rule_label.split(":")[0], scores[rule_label]
        for w in weightings:
            b = scores.get(budget_at_rule_label(rule_label, w))
            if b is None:  # a subset of the variants
                continue
            beats = [what for what, ours, theirs in (("delta", b["ppl_delta"], r["ppl_delta"]),
                                                     ("KLD", b["kld"]["mean"], r["kld"]["mean"]),
                                                     ("same top", -b["same_top"], -r["same_top"])) if ours < theirs]
            out.append(f"- at {rule}'s size ({w}): delta {b['ppl_delta']:+.3f} vs {r['ppl_delta']:+.3f}, KLD "
                       f"{b['kld']['mean']:.4f} vs {r['kld']['mean']:.4f}: the budget is better on "
                       f"{', '.join(beats) if beats else 'nothing'}.")
    if len(weightings) == 2:
        pairs = [label for label in scores if label.startswith("budget") and label.endswith(f"({weightings[0]})")
                 and label.replace(weightings[0], weightings[1]) in scores]
        wins = sum(scores[label]["kld"]["mean"] < scores[label.replace(weightings[0], weightings[1])]["kld"]["mean"]
                   for label in pairs)
        out.append(f"- weighting: {weightings[0]} has the lower KLD in {wins} of {len(pairs)} budget pairs.")
    return out


def markdown(results: dict, args, command: str) -> str:
    starts = "" if args.no_bos else ", every window begun with the tokenizer's start tokens (Gemma: its BOS; SmolLM2: none)"
    lines = [
        f"One GPTQ pass per model (4-bit, act-order with static groups, damping 0.01, true-sequential"
        f"{'' if args.no_scale_search else ', scale search'}{'' if args.no_awq_scales else ', AWQ input scales'}: "
        f"lowbit's defaults{' less what is named' if solver_tag(args) else ''}) scores "
        f"every Linear's candidates (4-bit at each finer group of 64 and 32, 8-bit, 16-bit) on c4 calibration, "
        f"{args.nsamples} x {args.seqlen} tokens, seed {args.calibration_seed}{starts}; every row is assembled from "
        f"those same kept candidates. Evaluation: lowbit's evaluator, wikitext-2 test, {args.eval_windows} windows x {args.eval_seqlen} tokens, the same for every row; "
        f"KLD and same-top against the bf16 base. CPU, {torch.get_num_threads()} threads. 'ratio': the row's delta "
        f"(or KLD) over uniform 4-bit's. Budget rows: `--target-bpw`'s choice (quantize/mixed.py), errors weighted "
        f"as named. The llama.cpp rule promotes v_proj and down_proj in the layers its Q4_K_M `use_more_bits` "
        f"picks (first and last eighth, every third between) to 8 bits (Q4_K_M uses Q6_K; 8 is the nearest "
        f"Marlin format); it splits the q/k/v group, which lowbit's loader and gptqmodel read but vLLM's fused "
        f"qkv_proj would refuse. Rule c is rule b as vLLM loads it: q/k/v promoted together where v_proj is. "
        f"bits/weight and bytes count the decoder Linears as written (g_idx included).",
        "",
    ]
    reduced = [what for what, ours, asked in (("calibration", f"{args.nsamples} x {args.seqlen}", "64 x 512"),
                                              ("evaluation", f"{args.eval_windows} x {args.eval_seqlen}", "40 x 512"))
               if ours != asked]
    if reduced:
        lines += [f"**Reduced** ({', '.join(reduced)}: the issue asks 64 x 512 calibration and 40 x 512 evaluation "
                  f"windows): CPU time on the shared 2-core machine. Every row of a model shares the same "
                  f"windows, so the comparisons between rows stand; the absolute figures are noisier.", ""]
    for name, result in results.items():
        scores = result["scores"]
        uniform = scores["uniform 4-bit"]
        base_ppl = uniform["ppl_base"]
        lines += [f"### {name} ({result['layers']} layers, group size {result['group_size']}); base perplexity "
                  f"{base_ppl:.3f}", "",
                  "| variant | bits/weight | decoder-Linear bytes | PPL | delta | delta ratio | KLD mean | KLD ratio | same top | 8-bit / 4g64 / 4g32 / 16-bit Linears |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, s in scores.items():
            counts = s["counts"]
            lines.append(
                f"| {label} | {s['bits_per_weight']:.3f} | {s['bytes']:,} | {s['ppl_quantized']:.3f} | "
                f"{s['ppl_delta']:+.3f} | {s['ppl_delta'] / uniform['ppl_delta']:.2f} | {s['kld']['mean']:.4f} | "
                f"{s['kld']['mean'] / uniform['kld']['mean']:.2f} | {100 * s['same_top']:.1f}% | "
                f"{counts['8g']} / {counts.get('4g64', 0)} / {counts['4g32']} / {counts['16']} |")
        lines += ["", *verdicts(scores), ""]
    lines += [f"Produced by: `{command}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calibration-seed", type=int, default=0, help="which calibration sample the solve draws")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--weightings", default=",".join(WEIGHTINGS), help="how the budget rows weigh errors")
    parser.add_argument("--no-scale-search", action="store_true", help="solve without lowbit's default scale search")
    parser.add_argument("--no-awq-scales", action="store_true", help="solve without lowbit's default AWQ input scales")
    parser.add_argument("--no-bos", action="store_true",
                        help="windows without the tokenizer's start tokens (the GPTQ reference's, as before 2026-12-06)")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "mixed")
    parser.add_argument("--solve-only", action="store_true", help="only the one GPTQ pass per model")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--fresh", action="store_true", help="score again even when a model's record exists")
    parser.add_argument("--section", default="mixed", help="the BENCHMARKS.md section to write")
    parser.add_argument("--variants", help="score only these variants (labels as the table prints them, ';'-separated)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.solve_only:
        for name in args.models.split(","):
            solved_job(name, args)
        return
    results = {name: run_model(name, args) for name in args.models.split(",")}
    command = "nice -n 5 python benchmarks/mixed.py " + shlex.join(sys.argv[1:])
    text = markdown(results, args, command)
    print(text)
    if not args.no_write:
        title = f"A size budget (--target-bpw) against uniform 4-bit and peers' rules, {args.eval_windows} x {args.eval_seqlen} windows"
        if args.section != "mixed":
            title += f" ({args.section})"
        replace_section(REPO / "BENCHMARKS.md", args.section, title, text)


if __name__ == "__main__":
    main()
