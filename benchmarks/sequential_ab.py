"""True-sequential with down_proj's inputs kept against recomputed, interleaved in one process.

    python benchmarks/sequential_ab.py --layers 6 --nsamples 64 --reps 2

Quantizes the first LAYERS decoder layers of SmolLM2-135M (GPTQ 4-bit g64, c4 windows) alternately with
down_proj's inputs kept (the engine's choice where they fit, quantize/plan.py: down_inputs_kept) and with
them recomputed (the MLP run once more, as the engine does where they do not fit). Alternating in one
process makes the two see the same machine load, which a shared 2-core machine would otherwise decide.
Reports the process CPU seconds of the window passes (their Hessian updates included) and of the whole
run, and checks that both give the same tensors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from benchmarks.markdown import replace_section  # noqa: E402
from benchmarks.phases import C4, SMOLLM2, first_layers  # noqa: E402
from lowbit.calibration.windows import CalibrationConfig  # noqa: E402
from lowbit.quantize import driver, steps  # noqa: E402
from lowbit.quantize.settings import QuantizeSettings  # noqa: E402

PASSES = ("run_layer_until", "run_attention_residual", "run_mlp_residual", "run_down_residual")


def timed_passes(clock: dict):
    """Wrap the driver's window passes so that their CPU seconds add up in clock["passes"], and the floating-point
    operations of their matrix products (torch's FlopCounterMode: a count that no machine load changes) in
    clock["flops"]."""
    from torch.utils.flop_counter import FlopCounterMode

    for name in PASSES:
        real = getattr(steps, name)

        def timed(*args, real=real, **kwargs):
            counter = FlopCounterMode(display=False)
            started = time.process_time()
            try:
                with counter:
                    return real(*args, **kwargs)
            finally:
                clock["passes"] += time.process_time() - started
                clock["flops"] += counter.get_total_flops()

        setattr(steps, name, timed)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "scale")
    args = parser.parse_args()
    model = first_layers(SMOLLM2, args.layers, args.work)
    calibration = CalibrationConfig(source=str(C4), nsamples=args.nsamples, seqlen=args.seqlen)
    kept_rule = driver.down_inputs_kept
    clock = {"passes": 0.0, "flops": 0}
    timed_passes(clock)
    runs: dict[str, list[tuple[float, float]]] = {"kept": [], "recomputed": []}
    flops: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.reps):
            for mode in runs:
                driver.down_inputs_kept = kept_rule if mode == "kept" else (lambda *a: 0)
                clock["passes"], clock["flops"], started = 0.0, 0, time.process_time()
                driver.quantize_model(str(model), Path(scratch) / f"{mode}-{rep}", QuantizeSettings(group_size=64),
                                      calibration)
                runs[mode].append((clock["passes"], time.process_time() - started))
                flops[mode] = clock["flops"]
                print(f"{mode} {rep}: window passes {clock['passes']:.1f} CPU s, run {runs[mode][-1][1]:.1f} CPU s",
                      flush=True)
        kept, recomputed = tensors(Path(scratch) / "kept-0"), tensors(Path(scratch) / "recomputed-0")
        same = kept.keys() == recomputed.keys() and all(torch.equal(kept[k], recomputed[k]) for k in kept)
    rows = ["| down_proj's inputs | window passes, GFLOP (matrix products, Hessian updates included) | "
            "window passes, CPU s (each run) | whole run, CPU s (each run) |", "|---|---|---|---|"]
    for mode, figures in runs.items():
        rows.append(f"| {mode} | {flops[mode] / 1e9:.0f} | {', '.join(f'{p:.1f}' for p, _ in figures)} | "
                    f"{', '.join(f'{t:.1f}' for _, t in figures)} |")
    best = {mode: min(t for _, t in figures) for mode, figures in runs.items()}
    body = "\n".join([
        f"SmolLM2-135M, first {args.layers} decoder layers, GPTQ 4-bit g64 (lowbit's defaults), {args.nsamples} x "
        f"{args.seqlen} c4 windows, CPU, the two modes alternating in one process (the same machine load for both: "
        f"compare the rows, not the figures with other sections).",
        "", *rows, "",
        f"Whole run, best of each: {best['kept']:.1f} against {best['recomputed']:.1f} CPU s "
        f"({best['kept'] / best['recomputed']:.2f}x). Matrix-product work of the window passes: "
        f"{flops['kept'] / flops['recomputed']:.2f}x. Same tensors bit for bit: {'yes' if same else 'NO'}.",
        "", f"Command: `python benchmarks/sequential_ab.py --layers {args.layers} --nsamples {args.nsamples} "
        f"--seqlen {args.seqlen} --reps {args.reps}`"])
    replace_section(REPO / "BENCHMARKS.md", "sequential-ab", "True-sequential: down_proj's inputs kept or recomputed",
                    body)
    print(body)


if __name__ == "__main__":
    main()
