"""How far is GPTQ's layer-wise solution from the best scales for its codes? (An upper bound on what more
scale search can buy.)

For each Linear of the given decoder layers: solve with lowbit's default GPTQ, then keep its codes and refit
every group scale of every row by exact least squares under the damped Hessian of the solving windows:

    min_s (w - A s) H (w - A s)^T,   A[k, g] = (code[k] - zero[g]) where column k is in group g,

rounded to float16 as the format stores it. Both are scored on held-out windows, as benchmarks/layer_errors.py
scores (same windows, same metric). The refit costs G products with the K x K Hessian per Linear: an
experiment, not a method.

    PYTHONPATH=. python benchmarks/scale_refit.py ~/.cache/lowbit-tests/gemma3-270m-bf16 --layers 0,6 --record
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.layer_errors import collect_linear_inputs, output_error
from lowbit.quantize.gptq import GPTQConfig, QuantizedWeight, gptq_quantize, rtn_quantize


def refit_scales(quantized: QuantizedWeight, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
    """The codes of quantized with every row's group scales chosen by least squares under hessian."""
    group = quantized.g_idx.long()
    centred = quantized.codes.float() - quantized.zeros[group].T.float()  # [N, K]
    n_groups = quantized.scales.shape[0]
    normal = torch.zeros(weight.shape[0], n_groups, n_groups)
    target = torch.zeros(weight.shape[0], n_groups)
    for g in range(n_groups):
        product = (centred * (group == g)) @ hessian  # [N, K]: row n's basis vector g times H
        for h in range(n_groups):
            normal[:, g, h] = (product[:, group == h] * centred[:, group == h]).sum(1)
        target[:, g] = (product * weight).sum(1)
    normal += 1e-8 * normal.diagonal(dim1=1, dim2=2).mean() * torch.eye(n_groups)
    scales = torch.linalg.solve(normal, target.unsqueeze(-1))[..., 0].T
    scales = torch.where(scales > 0, scales, quantized.scales).half().float()
    return replace(quantized, scales=scales)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", default="0,6")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    linears = collect_linear_inputs(args.model.expanduser(), [int(x) for x in args.layers.split(",")],
                                    args.nsamples, args.seqlen)
    config = GPTQConfig(bits=args.bits, group_size=args.group_size, act_order=True, static_groups=True,
                        scale_search=True)
    rows, ratios = ["| Linear | RTN | GPTQ (defaults) | GPTQ, scales refit | refit / GPTQ |", "|---|---|---|---|---|"], []
    for linear in (l for l in linears if l.weight.shape[1] % args.group_size == 0):
        damped = linear.solve.clone()
        damped.diagonal().add_(config.damp * damped.diagonal().mean())
        rtn = rtn_quantize(linear.weight, replace(config, scale_search=False)).dequantize()
        gptq, _ = gptq_quantize(linear.weight, linear.solve, config)
        refit = refit_scales(gptq, linear.weight, damped).dequantize()
        errors = [output_error(linear.weight, q, linear.held_out) for q in (rtn, gptq.dequantize(), refit)]
        ratios.append(errors[2] / errors[1])
        rows.append(f"| {linear.name} | {errors[0]:.5f} | {errors[1]:.5f} | {errors[2]:.5f} | {ratios[-1]:.3f} |")
    command = (f"PYTHONPATH=. python benchmarks/scale_refit.py {args.model} --layers {args.layers} --nsamples "
               f"{args.nsamples} --seqlen {args.seqlen} --bits {args.bits} --group-size {args.group_size}")
    text = (f"{args.bits}-bit, group {args.group_size}; {args.nsamples} x {args.seqlen} c4 windows to solve with, "
            f"as many others to score with (relative output error on the held-out inputs). Median refit / GPTQ: "
            f"**{statistics.median(ratios):.3f}**.\n\n```\n{command}\n```\n\n" + "\n".join(rows))
    print(text)
    if args.record:
        from benchmarks.markdown import replace_section

        replace_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", f"scale-refit-{args.model.name}",
                        f"GPTQ's codes with least-squares scales: {args.model.name}", text)


if __name__ == "__main__":
    main()
