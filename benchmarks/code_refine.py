"""A probe of a lever not in lowbit: coordinate descent on GPTQ's codes after its sweep (as QuantEase does).

GPTQ rounds each column once, spreading its error over the columns after it. Coordinate descent then revisits
every column in the sweep's order with the grid fixed: code j of each row becomes the grid point nearest to
Q_j + (D H)_j / H_jj, D = W - Q, the exact minimiser of tr(D H D^T) over that one code, so the objective never
rises. Each pass costs one N x K x K product and a column loop like the sweep's.

    python benchmarks/code_refine.py layers ~/.cache/lowbit-tests/gemma3-270m-bf16 --inputs /tmp/gemma-inputs.pt
    python benchmarks/code_refine.py model ~/.cache/lowbit-tests/gemma3-270m-bf16 OUT --passes 2

`layers`: held-out output error of lowbit's default GPTQ against 1, 2 and 4 passes (benchmarks/layer_errors.py's
windows and score). `model`: `lowbit quantize`'s defaults with the passes patched in after every sweep, written
to OUT for benchmarks/peer_llmcompressor.py's perplexity child. The patch keeps a copy of each Hessian, which the
engine does not, so it is a probe, not a feature (BENCHMARKS.md, "code-refine").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import lowbit  # noqa: E402,F401  (its OpenMP setting, before torch does any work)
from lowbit.quantize.gptq import GPTQConfig, QuantizedWeight  # noqa: E402
from lowbit.quantize.settings import QuantizeSettings  # noqa: E402

C4 = REPO.parent / "shared" / "data" / "c4" / "c4-sample.jsonl"


def refine_codes(W: torch.Tensor, q: QuantizedWeight, H: torch.Tensor, passes: int, order: torch.Tensor,
                 block: int = 128) -> QuantizedWeight:
    """passes of coordinate descent on tr((W - Q) H (W - Q)^T) over q's codes, columns in `order`."""
    n_rows, n_cols = W.shape
    group = q.g_idx.long()
    S, Z = (t[group].T[:, order].contiguous() for t in (q.scales, q.zeros.float()))
    codes = q.codes.float()[:, order].contiguous()
    W, H = W[:, order], H[order][:, order]
    Q = S * (codes - Z)
    R = (W - Q) @ H  # kept equal to D H as codes change
    diagonal = H.diagonal().tolist()
    for _ in range(passes):
        for start in range(0, n_cols, block):
            end = min(start + block, n_cols)
            changes = torch.zeros(n_rows, end - start)
            for j in range(start, end):
                code = torch.round((Q[:, j] + R[:, j] / diagonal[j]) / S[:, j]).add_(Z[:, j]).clamp_(0, 2**q.bits - 1)
                value = S[:, j] * (code - Z[:, j])
                torch.sub(value, Q[:, j], out=changes[:, j - start])
                codes[:, j], Q[:, j] = code, value
                R[:, start:end].addr_(changes[:, j - start], H[j, start:end], alpha=-1)
            R[:, :start].addmm_(changes, H[start:end, :start], alpha=-1)
            R[:, end:].addmm_(changes, H[start:end, end:], alpha=-1)
    inverse = torch.argsort(order)
    return QuantizedWeight(codes=codes[:, inverse].to(torch.uint8), scales=q.scales, zeros=q.zeros, g_idx=q.g_idx,
                           bits=q.bits)


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.clone()
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    return H


def layer_probe(args) -> None:
    from benchmarks.layer_errors import cached_linear_inputs, output_error
    from lowbit.quantize.gptq import gptq_quantize

    linears = cached_linear_inputs(args.inputs, args.model.expanduser(), [int(x) for x in args.layers.split(",")],
                                   args.nsamples, 512)
    config = GPTQConfig.from_settings(QuantizeSettings(bits=args.bits, group_size=args.group_size))
    ratios: dict[int, list[float]] = {1: [], 2: [], 4: []}
    for linear in linears:
        q, _ = gptq_quantize(linear.weight, linear.solve, config)
        before = output_error(linear.weight, q.dequantize(), linear.held_out)
        H, W = linear.solve.clone(), linear.weight.clone()
        dead = H.diagonal() == 0  # as the solver: dead inputs zeroed, H made invertible there
        H[dead, :], H[:, dead], W[:, dead] = 0, 0, 0
        H[dead, dead] = 1
        order = torch.argsort(linear.solve.diagonal(), descending=True)
        for passes in ratios:
            refined = refine_codes(W, q, damped(H, config.damp), passes, order)
            ratios[passes].append(output_error(linear.weight, refined.dequantize(), linear.held_out) / before)
        print(linear.name, " ".join(f"{p}: {r[-1]:.3f}" for p, r in ratios.items()), flush=True)
    for passes, values in ratios.items():
        print(f"{passes} passes: median held-out error ratio {statistics.median(values):.3f}, "
              f"below the default on {sum(v < 1 for v in values)}/{len(values)} Linears")


def model_probe(args) -> None:
    import lowbit.quantize.gptq as gptq
    from lowbit.calibration.windows import CalibrationConfig
    from lowbit.quantize.driver import RunOptions, quantize_model

    kept, factor, sweep = {}, gptq.damped_inverse_factor_, gptq._sweep_stacked

    def keep_then_factor(H, damp, *rest, **options):
        kept["H"] = H.clone()  # act-order's permutation of H, before the factor is made in its buffer
        return factor(H, damp, *rest, **options)

    def sweep_then_refine(W0, Hinv, perm, importances, configs, block_size, in_place):
        W = W0.clone()  # the sweep may work in W0's own buffer
        results = sweep(W0, Hinv, perm, importances, configs, block_size, in_place)
        inverse = torch.argsort(perm)
        H = damped(kept["H"][inverse][:, inverse], configs[0].damp)
        return [(refine_codes(W, q, H, args.passes, perm), loss) for q, loss in results]

    gptq.damped_inverse_factor_, gptq._sweep_stacked = keep_then_factor, sweep_then_refine
    calibration = CalibrationConfig(source=str(C4), nsamples=args.nsamples, seqlen=512, seed=0)
    start = time.time()
    quantize_model(str(args.model.expanduser()), args.out, QuantizeSettings(bits=args.bits, group_size=args.group_size),
                   calibration, RunOptions())
    print(f"quantized in {time.time() - start:.0f} s: {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("layers", "model"))
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path, nargs="?", help="model: the checkpoint folder to write")
    parser.add_argument("--layers", default="0,5,11,17")
    parser.add_argument("--inputs", type=Path, help="layers: keep the collected weights and Hessians here")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    layer_probe(args) if args.mode == "layers" else model_probe(args)


if __name__ == "__main__":
    main()
