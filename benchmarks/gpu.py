"""The prepared GPU check: one short run on a lent CUDA machine, its figures into BENCHMARKS.md.

    python benchmarks/gpu.py --json gpu.json                       # on the GPU machine: the whole check
    python benchmarks/gpu.py --reduced --device cpu --benchmarks /tmp/B.md   # the rehearsal the tests run

1. SmolLM2-135M end to end, if its bf16 folder is there (--smollm2; the device machine has no network, so
   carry it or skip it): GPTQ, NF4 and calibrated NF4, each evaluated against the base.
2. A Phi-4-shaped checkpoint (hidden 5120, intermediate 17920, random weights, --phi4-layers decoder
   layers) quantized with GPTQ on --nsamples x --seqlen calibration windows (128 x 2048 by default).
Each quantization runs in this process. After every progress step (the embedding, each decoder layer,
the writer) it records the wall time and torch.cuda.max_memory_allocated since the step before, and
compares the run's peak with quantize/plan.py's prediction for the same config and settings.
--reduced shrinks everything (a tiny Phi-4-proportioned model, a few short windows) so that the script
itself is tested on the CPU; memory is then not measured (no CUDA allocator to ask).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from lowbit.calibration.windows import CalibrationConfig  # noqa: E402
from lowbit.evals.evaluate import EvalOptions, evaluate  # noqa: E402
from lowbit.quantize.driver import QuantizeSettings, RunOptions, quantize_model  # noqa: E402
from lowbit.quantize.arch import model_shape  # noqa: E402
from lowbit.quantize.plan import GiB, PlanSettings, peaks, quantize_phases  # noqa: E402
from markdown import replace_section  # noqa: E402
from scale import PHI4_CONFIG, shrunk, write_truncated_checkpoint  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
NOT_ALLOCATED_BY_TORCH = ("decoder layer as read", "next decoder layer as read", "embedding as read", "weight as read",
                          "largest tensor being written", "process (Python, torch, transformers)")


class StepRecorder:
    """on_progress callback: the wall time and the peak of allocated device memory of every step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[dict] = []
        self.last = time.time()
        self._reset_peak()

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        self.steps.append({"stage": stage, "done": done, "total": total, "seconds": round(now - self.last, 2),
                           "peak_allocated_bytes": self._peak()})
        self.last = now
        self._reset_peak()

    def peak(self) -> int | None:
        values = [s["peak_allocated_bytes"] for s in self.steps if s["peak_allocated_bytes"] is not None]
        return max(values) if values else None


def predicted_device_peak(config: dict, settings: QuantizeSettings, calibration: CalibrationConfig | None,
                          device: torch.device, dtype: torch.dtype) -> dict:
    plan_settings = PlanSettings(settings, calibrated=calibration is not None and settings.method != "rtn",
                                 nsamples=calibration.nsamples if calibration else 0,
                                 seqlen=calibration.seqlen if calibration else 0,
                                 device=device.type, compute_bytes=torch.empty((), dtype=dtype).element_size())
    phases = quantize_phases(model_shape(config), plan_settings)
    device_peak, host_peak = peaks(phases, plan_settings)
    peak = device_peak if device.type == "cuda" else host_peak
    allocated = {k: v for k, v in peak.parts.items() if k not in NOT_ALLOCATED_BY_TORCH}
    return {"phase": peak.phase, "allocated_bytes": sum(allocated.values())}


def quantize_recorded(name: str, model: Path, output: Path, settings: QuantizeSettings,
                      calibration: CalibrationConfig | None, device: torch.device) -> dict:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    recorder = StepRecorder(device)
    started = time.time()
    result = quantize_model(str(model), output, settings, calibration,
                            RunOptions(device=str(device), force=True), on_progress=recorder)
    config = json.loads((model / "config.json").read_text())
    predicted = predicted_device_peak(config, settings, calibration, device, dtype)
    measured = recorder.peak()
    layers = [s["seconds"] for s in recorder.steps if s["stage"] == "quantize" and s["done"] > 0]
    print(f"[{name}] {time.time() - started:.1f} s, peak allocated "
          f"{'n/a' if measured is None else f'{measured / GiB:.2f} GiB'}, "
          f"predicted {predicted['allocated_bytes'] / GiB:.2f} GiB at '{predicted['phase']}'", flush=True)
    return {"name": name, "seconds": round(time.time() - started, 1), "steps": recorder.steps,
            "seconds_per_layer": round(sum(layers) / len(layers), 2) if layers else None,
            "peak_allocated_bytes": measured, "predicted": predicted,
            "ratio": round(predicted["allocated_bytes"] / measured, 3) if measured else None,
            "bits_per_weight": result.manifest.get("bits_per_weight")}


def evaluate_recorded(name: str, quantized: Path, base: Path, dataset: str, device: torch.device,
                      windows: int, seqlen: int) -> dict:
    started = time.time()
    report = evaluate(quantized, base, dataset, EvalOptions(seqlen=seqlen, max_windows=windows, device=str(device)))
    summary = {"name": name, "seconds": round(time.time() - started, 1), "ppl_base": round(report["ppl_base"], 3),
               "ppl": round(report["ppl_quantized"], 3), "kld": round(report["kld"]["mean"], 4),
               "same_top": round(report["same_top"], 4)}
    print(f"[{name}] eval {summary}", flush=True)
    return summary


def time_solve(device: torch.device, n: int, k: int) -> dict:
    """One GPTQ solve of a [n, k] Linear (Phi-4's down_proj: 5120 x 17920) on a random Hessian: the wall time of
    the whole solve and of its K x K factorisation alone; the rest is the column sweep, given per column."""
    from lowbit.quantize.gptq import GPTQConfig, gptq_quantize
    from lowbit.quantize.hessian_factor import damped_inverse_factor_

    def synced() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.time()

    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(min(4 * k, 8192), k, device=device, generator=generator)
    hessian = x.T @ x / x.shape[0]
    del x
    weight = torch.randn(n, k, device=device, generator=generator) * 0.02
    started = synced()
    damped_inverse_factor_(hessian.clone(), 0.01)
    factor_s = synced() - started
    started = synced()
    gptq_quantize(weight, hessian, GPTQConfig(bits=4, group_size=128), consume_hessian=True)
    solve_s = synced() - started
    return {"shape": [n, k], "solve_s": round(solve_s, 2), "factor_s": round(factor_s, 2),
            "sweep_us_per_column": round(1e6 * max(solve_s - factor_s, 0.0) / k, 1)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def markdown(results: dict, command: str) -> str:
    lines = [f"Device: **{results['device']}**. Command: `{command}`.", "",
             "| run | wall time | s per decoder layer | peak allocated | plan's prediction | plan / measured |",
             "|---|---|---|---|---|---|"]
    for q in results["quantize"]:
        peak = "n/a" if q["peak_allocated_bytes"] is None else f"{q['peak_allocated_bytes'] / GiB:.2f} GiB"
        lines.append(f"| {q['name']} | {q['seconds']} s | {q['seconds_per_layer']} | {peak} | "
                     f"{q['predicted']['allocated_bytes'] / GiB:.2f} GiB at '{q['predicted']['phase']}' | "
                     f"{q['ratio'] if q['ratio'] is not None else 'n/a'} |")
    if results["eval"]:
        lines += ["", "| evaluation | wall time | base PPL | PPL | KLD | same top |", "|---|---|---|---|---|---|"]
        for e in results["eval"]:
            lines.append(f"| {e['name']} | {e['seconds']} s | {e['ppl_base']} | {e['ppl']} | {e['kld']} | "
                         f"{e['same_top']} |")
    if results.get("solve"):
        solve = results["solve"]
        lines += ["", f"One GPTQ solve of a {solve['shape'][0]} x {solve['shape'][1]} Linear (4-bit g128, random "
                  f"Hessian): {solve['solve_s']} s, of which the K x K factorisation {solve['factor_s']} s; the "
                  f"column sweep {solve['sweep_us_per_column']} us a column."]
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(results["skipped"]) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reduced", action="store_true", help="tiny shapes and windows: the CPU rehearsal")
    parser.add_argument("--smollm2", type=Path, default=Path.home() / ".cache" / "lowbit-tests" / "smollm2-135m-bf16")
    parser.add_argument("--calibration", default=str(SHARED / "c4" / "c4-sample.jsonl"))
    parser.add_argument("--eval-data", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--phi4-layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from lowbit.quantize.stream import pick_device

    device = pick_device(args.device)
    calibration_source = args.calibration if Path(args.calibration).exists() else "pydoc"
    eval_data = args.eval_data if Path(args.eval_data).exists() else "pydoc"
    nsamples, seqlen = (4, 64) if args.reduced else (args.nsamples, args.seqlen)
    phi4 = dict(PHI4_CONFIG)
    if args.reduced:  # Phi-4's proportions / 10 (hidden 512, intermediate 1792), the byte tokenizer's vocabulary
        phi4 = {**shrunk(PHI4_CONFIG, 10), "vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    results = {"device": device_name(device), "quantize": [], "eval": [], "skipped": []}
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        if args.smollm2.joinpath("config.json").exists() and not args.reduced:
            calibration = CalibrationConfig(source=calibration_source, nsamples=nsamples, seqlen=seqlen)
            for method, calibrated in (("gptq", True), ("nf4", False), ("nf4", True)):
                name = f"SmolLM2 {method}{' calibrated' if calibrated and method == 'nf4' else ''}"
                settings = QuantizeSettings(method=method, group_size=64 if method == "gptq" else 128)
                out = work / name.replace(" ", "-")
                results["quantize"].append(quantize_recorded(name, args.smollm2, out, settings,
                                                             calibration if calibrated else None, device))
                results["eval"].append(evaluate_recorded(name, out, args.smollm2, eval_data, device, 40, 2048))
        else:
            results["skipped"].append(f"SmolLM2 end to end ({args.smollm2} absent)" if not args.reduced
                                      else "SmolLM2 (reduced run)")
        model = write_truncated_checkpoint(work / "phi4-shape", phi4, args.phi4_layers)
        calibration = CalibrationConfig(source=calibration_source, nsamples=nsamples, seqlen=seqlen)
        name = f"Phi-4 shape, {args.phi4_layers} layers, GPTQ 4-bit g128, {nsamples} x {seqlen}"
        results["quantize"].append(quantize_recorded(name, model, work / "phi4-gptq", QuantizeSettings(),
                                                     calibration, device))
        if args.reduced:
            results["eval"].append(evaluate_recorded("Phi-4 shape (reduced)", work / "phi4-gptq", model, eval_data,
                                                     device, 2, 32))
    results["solve"] = time_solve(device, *((512, 1792) if args.reduced else (5120, 17920)))
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    title = "GPU check" if not args.reduced else "GPU check (reduced rehearsal on the CPU)"
    replace_section(args.benchmarks, "gpu" if not args.reduced else "gpu-reduced", title, markdown(results, command))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
