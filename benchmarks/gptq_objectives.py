"""What GPTQ's objective is worth on Gemma-3-270M: two changes to what each Linear's solve minimises.

    python benchmarks/gptq_objectives.py --variants plain,propagate,post-norm --json objectives.json

Each variant runs the same layer-by-layer GPTQ (lowbit's solver with its defaults, true-sequential,
one group at a time), in memory on the whole model, and the model is scored by plain transformers on
the first wikitext-2 windows. Only the Hessian (and the target) handed to the solver differ:

- plain: H = sum x x^T over the quantized model's inputs, as `lowbit quantize` does;
- propagate: the layer's output is matched to the full-precision model's (error propagation, as
  GPTAQ/QEP): the target weight W + W dX^T X H^-1, dX = full-precision inputs - quantized ones;
- post-norm: Gemma 3 normalises o_proj's and down_proj's outputs (post_attention_layernorm,
  post_feedforward_layernorm) before the residual add, so an output error of token t is scaled by
  1 / rms(W x_t). Their Hessians weigh each token by 1 / rms(W x_t)^2 (its mean over a window 1).
- awq: the prototype of quantize/input_scales.py: each group's weight columns scaled by rms(x)^alpha
  (alpha by the group's RTN output error), solved against the scaled Hessian, and the layer given Q / s
  (in memory, so nothing is rounded by a fold).

The calibration windows are lowbit's (`c4`, seed 0); the result goes to BENCHMARKS.md with --section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.gemma_groups import perplexity, wikitext_windows  # noqa: E402
from benchmarks.markdown import replace_section  # noqa: E402
from lowbit.calibration.windows import CalibrationConfig  # noqa: E402
from lowbit.quantize.settings import QuantizeSettings  # noqa: E402
from lowbit.quantize.solve import make_solver  # noqa: E402

GEMMA = Path.home() / ".cache" / "lowbit-tests" / "gemma3-270m-bf16"
C4 = REPO.parent / "shared" / "data" / "c4" / "c4-sample.jsonl"
VARIANTS = ("plain", "propagate", "post-norm", "awq")
AWQ_ALPHAS = tuple(i / 20 for i in range(20))
POST_NORMED = ("o_proj", "down_proj")  # Gemma 3: their outputs pass an RMSNorm before the residual add


class _Stop(Exception):
    pass


def projection_groups(layer) -> list[list[str]]:
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    suffixes = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    return [[n for n in names if n.endswith(s)] for s in suffixes]


def layer_inputs(model, windows: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Every window's hidden states entering layer 0, and the arguments the model passes each layer."""
    layers = model.model.layers
    kwargs: list[dict] = [{} for _ in layers]
    skip = ("past_key_values", "use_cache", "cache_position")

    def keep(i):
        return lambda m, a, kw: kwargs.__setitem__(i, {k: v for k, v in kw.items() if k not in skip})

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=windows[:1], use_cache=False)
    for handle in handles:
        handle.remove()
    hidden = torch.empty(windows.shape[0], windows.shape[1], model.config.get_text_config().hidden_size)

    def catch(m, a, kw):
        catch.x = a[0] if a else kw["hidden_states"]
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for i in range(windows.shape[0]):
            try:
                model(input_ids=windows[i : i + 1], use_cache=False)
            except _Stop:
                hidden[i] = catch.x[0]
    handle.remove()
    return hidden, kwargs


def forward(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def group_inputs(layer, hidden, kwargs, modules) -> list[torch.Tensor]:
    """The full-precision layer's input to each module, every window; hidden moves on to its outputs."""
    kept = [torch.empty(*hidden.shape[:2], m.in_features) for m in modules]
    current = [0]
    handles = [m.register_forward_pre_hook(lambda mod, a, j=j: kept[j].__setitem__(current[0], a[0][0]))
               for j, m in enumerate(modules)]
    with torch.no_grad():
        for i in range(hidden.shape[0]):
            current[0] = i
            hidden[i] = forward(layer, hidden[i : i + 1], kwargs)[0]
    for handle in handles:
        handle.remove()
    return kept


def quantize_in_memory(model, windows: torch.Tensor, variant: str, settings: QuantizeSettings) -> None:
    hidden, kwargs = layer_inputs(model, windows)
    full_precision = hidden.clone() if variant == "propagate" else None
    solve = make_solver(settings)
    for index, layer in enumerate(model.model.layers):
        groups = projection_groups(layer)
        firsts = [layer.get_submodule(g[0]) for g in groups]
        targets = group_inputs(layer, full_precision, kwargs[index], firsts) if full_precision is not None else None
        for j, group in enumerate(groups):
            first = firsts[j]
            columns = first.in_features
            H = torch.zeros(columns, columns)
            cross = torch.zeros(columns, columns) if targets is not None else None
            weighted = variant == "post-norm" and group[0].endswith(POST_NORMED)
            original = first.weight.data.clone()
            current = [0]

            def accumulate(mod, a):
                x = a[0][0]
                if weighted:
                    w = 1.0 / ((x @ original.T).square().mean(-1) + 1e-6)
                    H.addmm_((x * (w / w.mean())[:, None]).T, x)
                else:
                    H.addmm_(x.T, x)
                if cross is not None:
                    cross.addmm_((targets[j][current[0]] - x).T, x)
                raise _Stop

            handle = first.register_forward_pre_hook(accumulate)
            with torch.no_grad():
                for i in range(hidden.shape[0]):
                    current[0] = i
                    try:
                        forward(layer, hidden[i : i + 1], kwargs[index])
                    except _Stop:
                        pass
            handle.remove()
            rows = hidden.shape[0] * hidden.shape[1]
            scale = awq_scale(layer, group, H, settings) if variant == "awq" else None
            damped = H + settings.damp * H.diagonal().mean() * torch.eye(columns)
            for name in group:
                linear = layer.get_submodule(name)
                weight = linear.weight.data.clone()
                if cross is not None:
                    weight += torch.linalg.solve(damped, (weight @ cross).T).T
                if scale is None:
                    solved = solve(weight, H * (2 / rows), None, False)
                    linear.weight.data = solved.dequantized.to(linear.weight.dtype)
                else:
                    scaled_h = H / scale[:, None] / scale[None, :]
                    solved = solve(weight * scale, scaled_h * (2 / rows), None, False)
                    linear.weight.data = (solved.dequantized / scale).to(linear.weight.dtype)
        with torch.no_grad():
            for i in range(hidden.shape[0]):
                hidden[i] = forward(layer, hidden[i : i + 1], kwargs[index])[0]
        print(f"  {variant}: layer {index} done", flush=True)


def awq_scale(layer, group, H, settings) -> torch.Tensor:
    """Per input column s = rms(x)^alpha (o_proj: shared by the query heads of one value channel), alpha
    chosen from AWQ_ALPHAS by the group's round-to-nearest output error tr(E H E^T), E = W - RTN(W s) / s."""
    from lowbit.quantize.grid import dequantize_codes, grid_params_per_group, quantize_to_codes

    rms = H.diagonal().clamp_min(1e-12).sqrt()
    if group[0].endswith("o_proj"):
        attention = layer.self_attn
        heads = attention.config.num_attention_heads // attention.config.num_key_value_heads
        rms = rms.reshape(heads, -1).mean(0).repeat(heads)
    weights = [layer.get_submodule(name).weight.data.float() for name in group]
    size = settings.group_size

    def rtn(w):
        scale, zero = grid_params_per_group(w, size, settings.bits, settings.sym)
        n, k = w.shape
        blocks = w.reshape(n, k // size, size).transpose(0, 1)
        return torch.stack([dequantize_codes(quantize_to_codes(b, s, z, settings.bits), s, z)
                            for b, s, z in zip(blocks, scale, zero)]).transpose(0, 1).reshape(n, k)

    best, best_error = torch.ones_like(rms), None
    for alpha in AWQ_ALPHAS:
        s = rms.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w in weights:
            e = w - rtn(w * s) / s
            error += float(((e @ H) * e).sum())
        if best_error is None or error < best_error:
            best, best_error = s, error
    print(f"    awq {group[0]}: alpha {float(best.log().std() / rms.log().std()) if rms.log().std() > 0 else 0:.2f}", flush=True)
    return best


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=GEMMA)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--json", type=Path, help="add the results to this file (kept between runs)")
    parser.add_argument("--section", help="write the results in the json to BENCHMARKS.md under this key")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    evaluation = wikitext_windows(tokenizer, args.eval_windows, args.seqlen)
    settings = QuantizeSettings(method="gptq", bits=args.bits, group_size=args.group_size)
    config = f"{args.bits}g{args.group_size}"
    for variant in ["base"] + [v for v in args.variants.split(",") if v]:
        key = f"{config} {variant}" if variant != "base" else "base"
        if key in results:
            continue
        if variant not in VARIANTS + ("base",):
            raise SystemExit(f"unknown variant {variant!r} (use {', '.join(VARIANTS)})")
        started = time.time()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
        if variant != "base":
            windows, _ = CalibrationConfig(source=str(C4), nsamples=args.nsamples, seqlen=args.seqlen).build(tokenizer)
            quantize_in_memory(model, windows, variant, settings)
        results[key] = {"perplexity": perplexity(model, evaluation), "seconds": round(time.time() - started)}
        print(f"{key}: perplexity {results[key]['perplexity']:.3f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    if args.section:
        write_section(results, args)


def write_section(results: dict, args) -> None:
    base = results["base"]["perplexity"]
    rows = ["| config | variant | PPL | delta | delta / plain |", "|---|---|---|---|---|", f"| | base | {base:.3f} | | |"]
    for key, result in results.items():
        if key == "base":
            continue
        config, variant = key.split(" ", 1)
        plain = results.get(f"{config} plain", {}).get("perplexity")
        delta = result["perplexity"] - base
        ratio = f"{delta / (plain - base):.2f}x" if plain else ""
        rows.append(f"| {config} | {variant} | {result['perplexity']:.3f} | {delta:+.3f} | {ratio} |")
    command = "python benchmarks/gptq_objectives.py " + " ".join(sys.argv[1:])
    body = (f"{args.model.name}, GPTQ with lowbit's defaults, {args.nsamples} x {args.seqlen} c4 windows, scored on the "
            f"first {args.eval_windows} x {args.seqlen} wikitext-2 windows (benchmarks/gemma_groups.py's protocol). "
            "Variants as the script's docstring describes.\n\n" + "\n".join(rows) + f"\n\nProduced by: `{command}`")
    replace_section(REPO / "BENCHMARKS.md", args.section, "What GPTQ's objective is worth on Gemma-3-270M", body)


if __name__ == "__main__":
    main()
