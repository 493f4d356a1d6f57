"""Per-Linear output error of each solver variant, scored on held-out calibration windows.

For the first decoder layers of a real model, the input of every Linear is recorded
with forward hooks on the plain transformers model, over two disjoint sets of c4
windows: one to solve with (its Hessian goes to GPTQ, calibrated NF4, the scale
search), one held out to score with. The score of a dequantized weight Q is the
relative output error on the held-out inputs:

    tr((W - Q) H (W - Q)^T) / tr(W H W^T),   H = mean of x x^T over held-out rows.

    PYTHONPATH=. python benchmarks/layer_errors.py ~/.cache/lowbit-tests/smollm2-135m-bf16 --layers 0,1
    PYTHONPATH=. python benchmarks/layer_errors.py ... --record   # writes its section of BENCHMARKS.md
    PYTHONPATH=. python benchmarks/layer_errors.py ... --levers   # the solver's levers against its defaults

--inputs FILE keeps the recorded weights and Hessians (collecting them is most of a run on 2 cores) and
reuses them when the model, layers and windows match.

tests/test_layer_errors.py uses the same functions on fewer, shorter windows.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lowbit.quantize.gptq import GPTQConfig, gptq_quantize, rtn_quantize
from lowbit.quantize.nf4 import BnbConfig, quantize_bnb
from lowbit.quantize.settings import QuantizeSettings

C4 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "c4" / "c4-sample.jsonl"


@dataclass(frozen=True)
class LinearInputs:
    name: str  # e.g. "model.layers.0.self_attn.q_proj"
    weight: torch.Tensor  # float32 [N, K]
    solve: torch.Tensor  # Hessian of the solving windows (2/n sum x x^T, as the driver)
    held_out: torch.Tensor  # Hessian of the held-out windows


def c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of nsamples windows from the two halves of the c4 sample's token stream: never overlapping."""
    from lowbit.calibration.sources import read_text_source
    from lowbit.calibration.windows import sample_windows, tokenize_documents

    tokens = tokenize_documents(read_text_source(str(C4)).documents, tokenizer)
    half = len(tokens) // 2
    return (sample_windows(tokens[:half], nsamples, seqlen, seed),
            sample_windows(tokens[half:], nsamples, seqlen, seed + 1))


def collect_linear_inputs(model_dir: Path, layers: list[int], nsamples: int, seqlen: int) -> list[LinearInputs]:
    """Weights and both Hessians of every Linear in the given decoder layers (float32, CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[: max(layers) + 1]  # nothing past the last layer scored
    linears = {f"model.layers.{i}.{name}": module for i in layers
               for name, module in model.model.layers[i].named_modules() if isinstance(module, torch.nn.Linear)}
    hessians = {}
    for which, windows in zip(("solve", "held_out"), c4_windows(tokenizer, nsamples, seqlen)):
        sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
        rows = {name: 0 for name in linears}

        def hook(name):
            def add(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] += x.T @ x
                rows[name] += x.shape[0]
            return add

        handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
        with torch.no_grad():
            for window in windows:
                model.model(input_ids=window[None])
        for h in handles:
            h.remove()
        hessians[which] = {name: 2 * sums[name] / rows[name] for name in linears}
    return [LinearInputs(name, m.weight.detach().float().clone(), hessians["solve"][name], hessians["held_out"][name])
            for name, m in linears.items()]


def cached_linear_inputs(cache: Path | None, model_dir: Path, layers: list[int], nsamples: int,
                         seqlen: int) -> list[LinearInputs]:
    """collect_linear_inputs, kept in (and reused from) cache when it was made with the same arguments."""
    key = {"model": str(model_dir), "layers": layers, "nsamples": nsamples, "seqlen": seqlen}
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        if saved["key"] == key:
            return [LinearInputs(**fields) for fields in saved["linears"]]
    linears = collect_linear_inputs(model_dir, layers, nsamples, seqlen)
    if cache is not None:
        torch.save({"key": key, "linears": [vars(linear) for linear in linears]}, cache)
    return linears


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    d = weight - dequantized
    return float(((d @ hessian) * d).sum() / ((weight @ hessian) * weight).sum())


def uniform_variants(bits: int, group_size: int) -> dict[str, tuple[str, GPTQConfig]]:
    """Name -> (solver, config) of the uniform-grid variants compared."""
    base = GPTQConfig(bits=bits, group_size=group_size)
    search = replace(base, scale_search=True)
    in_place = replace(search, act_order=True, static_groups=True)
    return {
        "rtn": ("rtn", base),
        "rtn+ss": ("rtn", search),
        "gptq": ("gptq", base),
        "gptq+ss": ("gptq", search),
        "gptq+act(in place)": ("gptq", replace(base, act_order=True, static_groups=True)),
        "gptq+act(in place)+ss": ("gptq", in_place),
        "gptq+act(desc_act)+ss": ("gptq", replace(search, act_order=True)),
        "gptq+act(in place)+ss damp 0.1": ("gptq", replace(in_place, damp=0.1)),
    }


def lever_variants(bits: int, group_size: int) -> dict[str, tuple[str, GPTQConfig]]:
    """Name -> (solver, config): GPTQ with lowbit's defaults, and with one lever moved at a time."""
    default = GPTQConfig.from_settings(QuantizeSettings(bits=bits, group_size=group_size))
    return {
        "default": ("gptq", default),
        "scale search weighted by the sweep's 1 / U_kk^2": ("gptq", replace(default, search_weights="sweep")),
        "no scale search (llm-compressor's default)": ("gptq", replace(default, scale_search=False)),
        "asymmetric grid": ("gptq", replace(default, sym=False)),
        "asymmetric grid, sweep weights": ("gptq", replace(default, sym=False, search_weights="sweep")),
        "damp 0.003": ("gptq", replace(default, damp=0.003)),
        "damp 0.03": ("gptq", replace(default, damp=0.03)),
        "damp 0.1": ("gptq", replace(default, damp=0.1)),
        "groups in solving order (desc_act)": ("gptq", replace(default, static_groups=False)),
    }


def solve_uniform(linear: LinearInputs, solver: str, config: GPTQConfig) -> torch.Tensor:
    if solver == "rtn":
        return rtn_quantize(linear.weight, config, linear.solve.diagonal()).dequantize()
    return gptq_quantize(linear.weight, linear.solve, config)[0].dequantize()


def nf4_variants() -> dict[str, BnbConfig | None]:
    return {"nf4": None, "nf4 calibrated": BnbConfig(), "nf4 calibrated+ss": BnbConfig(scale_search=True)}


def solve_nf4(linear: LinearInputs, config: BnbConfig | None) -> torch.Tensor:
    weight = linear.weight.to(torch.bfloat16)  # the source dtype: bitsandbytes rounds values to it
    if config is None:
        return quantize_bnb(weight, BnbConfig())[1]
    return quantize_bnb(weight, config, linear.solve)[1]


def error_table(linears: list[LinearInputs], variants: dict, solve) -> dict[str, list[float]]:
    """Variant -> held-out output error of each Linear, in order."""
    return {name: [output_error(l.weight, solve(l, *_args(spec)), l.held_out) for l in linears]
            for name, spec in variants.items()}


def _args(spec) -> tuple:
    return spec if isinstance(spec, tuple) else (spec,)


def summary_rows(errors: dict[str, list[float]], reference: str) -> list[str]:
    """Markdown rows: variant, median error, median ratio to reference, share of Linears below reference."""
    rows = []
    for name, values in errors.items():
        ratios = [v / r for v, r in zip(values, errors[reference])]
        wins = sum(v < r for v, r in zip(values, errors[reference]))
        rows.append(f"| {name} | {statistics.median(values):.5f} | {statistics.median(ratios):.3f} | "
                    f"{wins}/{len(values)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", default="0,1", help="decoder layers, comma-separated")
    parser.add_argument("--nsamples", type=int, default=32, help="windows in each of the two sets")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--configs", default="4:64,4:128,3:64", help="bits:group_size, comma-separated")
    parser.add_argument("--levers", action="store_true",
                        help="GPTQ's defaults against one lever moved at a time (instead of every method)")
    parser.add_argument("--inputs", type=Path, help="keep the collected weights and Hessians here, and reuse them")
    parser.add_argument("--record", action="store_true", help="write the tables into BENCHMARKS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    linears = cached_linear_inputs(args.inputs, args.model.expanduser(), layers, args.nsamples, args.seqlen)
    header = ["| variant | median error | median ratio to the reference | Linears below it |", "|---|---|---|---|"]
    variants, reference = (lever_variants, "default") if args.levers else (uniform_variants, "rtn")
    body = []
    for spec in args.configs.split(","):
        bits, group_size = (int(x) for x in spec.split(":"))
        fitting = [l for l in linears if l.weight.shape[1] % group_size == 0]
        errors = error_table(fitting, variants(bits, group_size), solve_uniform)
        body += [f"**{bits}-bit, group {group_size}** ({len(fitting)} Linears whose inputs it divides; "
                 f"reference: {reference})", "", *header, *summary_rows(errors, reference), ""]
        print("\n".join(body[-len(errors) - 5 :]), flush=True)  # a long run shows each table as it ends
    if not args.levers:
        errors = error_table(linears, nf4_variants(), solve_nf4)
        body += ["**NF4, block 64, double quant** (reference: nf4)", "", *header, *summary_rows(errors, "nf4"), ""]
    command = (f"PYTHONPATH=. python benchmarks/layer_errors.py {args.model} --layers {args.layers} "
               f"--nsamples {args.nsamples} --seqlen {args.seqlen} --configs {args.configs}"
               + (" --levers" if args.levers else ""))
    text = (f"{len(linears)} Linears of decoder layers {args.layers}; {args.nsamples} x {args.seqlen} c4 windows "
            f"to solve with, {args.nsamples} x {args.seqlen} other c4 windows (the other half of the sample) "
            f"to score with. Error: relative output error on the held-out inputs.\n\n"
            f"```\n{command}\n```\n\n" + "\n".join(body))
    print(text)
    if args.record:
        from benchmarks.markdown import replace_section

        model = args.model.name
        key, title = (f"layer-levers-{model}", f"GPTQ's levers, per-Linear output error on held-out windows: {model}") \
            if args.levers else (f"layer-errors-{model}", f"Per-Linear output error on held-out windows: {model}")
        replace_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", key, title, text)


if __name__ == "__main__":
    main()
