"""A probe of another error measure for the size budget: what each candidate puts into the residual stream
(notes, not the record; the product's budget does not use it).

quantize/mixed.py scores a candidate by its Linear's own relative output error ||(W - Q) x||^2 / ||W x||^2.
Here a unit's candidate is scored by the error of its whole sublayer's update instead, per token and relative
to the residual stream it leaves: mean over tokens of ||u_c - u||^2 / ||h + u||^2, where u is attention's
(or the MLP's) update with every Linear unquantized and u_c the same with the unit's Linears in candidate c.
That counts what q/k/v and gate/up errors become after attention and the activation, and how much of the
stream the sublayer writes. The layer inputs h come from the unquantized model on the first 8 calibration
windows (not the true-sequential stream), so this needs a pass the layer loop does not make: a probe.

It reuses benchmarks/mixed.py's one solve per model (its cache folder, `--out`) and writes each candidate
format uniformly once (the AWQ scales are the same in all of them, so their Linears can be swapped).

    python benchmarks/mixed.py --models smollm2 --solve-only --out DIR --no-write
    python benchmarks/mixed_residual_probe.py --model smollm2 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmarks.mixed as bm  # noqa: E402
from lowbit.quantize.arch import LayerNorms  # noqa: E402
from lowbit.quantize.assemble import mixed_units, write_checkpoint  # noqa: E402
from lowbit.quantize.loader import load_dequantized_model  # noqa: E402
from lowbit.quantize.mixed import Option, Unit, choose  # noqa: E402
from lowbit.quantize.pack import UNQUANTIZED, LinearFormat  # noqa: E402


def layer_inputs(model, windows: torch.Tensor) -> list[tuple]:
    """Per decoder layer, (hidden states in, position embeddings, attention mask) of one forward."""
    captured = {}

    def hook(index):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = (hidden.clone(), kwargs.get("position_embeddings"), kwargs.get("attention_mask"))
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return [captured[i] for i in range(len(model.model.layers))]


def attention_update(layer, norms: LayerNorms, hidden, position_embeddings, mask):
    out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), position_embeddings=position_embeddings,
                          attention_mask=mask)[0]
    return layer.get_submodule(norms.after_attention)(out) if norms.after_attention else out


def mlp_update(layer, norms: LayerNorms, hidden):
    out = layer.mlp(layer.get_submodule(norms.before_mlp)(hidden))
    return layer.get_submodule(norms.after_mlp)(out) if norms.after_mlp else out


def residual_errors(units, models: dict, norms: LayerNorms, base_inputs: list[tuple]) -> dict:
    """{(unit modules, format): mean over tokens of ||u_c - u||^2 / ||h + u||^2}, the other Linears unquantized;
    norms: where the layer's norms sit around its two branches (the architecture's)."""
    dense = models[UNQUANTIZED]
    errors = {}
    for i, (hidden, position_embeddings, mask) in enumerate(base_inputs):
        reference = dense.model.layers[i]
        attention = attention_update(reference, norms, hidden, position_embeddings, mask)
        middle = hidden + attention
        mlp = mlp_update(reference, norms, middle)
        stream = {"attn": middle.float().square().sum(-1), "mlp": (middle + mlp).float().square().sum(-1)}
        for unit in [u for u in units if f"layers.{i}." in u.modules[0]]:
            for option in unit.options:
                layer = copy.deepcopy(reference)
                for name in unit.modules:
                    inside = name.split(f"layers.{i}.", 1)[1]
                    candidate = models[option.fmt].model.layers[i].get_submodule(inside)
                    layer.get_submodule(inside).weight.copy_(candidate.weight)
                if "self_attn" in unit.modules[0]:
                    diff = attention_update(layer, norms, hidden, position_embeddings, mask) - attention
                    energy = stream["attn"]
                else:
                    diff = mlp_update(layer, norms, middle) - mlp
                    energy = stream["mlp"]
                errors[(unit.modules, option.fmt)] = float((diff.float().square().sum(-1) / energy).mean())
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(bm.MODELS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="benchmarks/mixed.py's cache folder of the solve")
    parser.add_argument("--extra", default="0.25", help="bits per weight over uniform, comma-separated")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows the errors are measured on")
    parser.add_argument("--choose-only", action="store_true", help="print the choice, write and score nothing")
    args = parser.parse_args(argv)
    solve_args = argparse.Namespace(nsamples=64, seqlen=512, calibration_seed=0, no_bos=False, no_scale_search=False,
                                    no_awq_scales=False, out=args.out, eval_windows=40, eval_seqlen=512)
    torch.set_grad_enabled(False)
    job = bm.solved_job(args.model, solve_args)
    units = mixed_units(job)
    base = LinearFormat(job.settings.bits, job.settings.group_size)
    modules = [m for unit in units for m in unit.modules]
    probe = args.out / args.model / "residual-probe"
    models = {}
    for fmt in {option.fmt for unit in units for option in unit.options}:
        folder = probe / f"uniform-{fmt.tag}"
        if not (folder / "lowbit_manifest.json").exists():
            write_checkpoint(job, {} if fmt == base else {m: fmt for m in modules}, folder, allow_split=True)
        models[fmt] = load_dequantized_model(folder).eval()
    inputs = layer_inputs(models[UNQUANTIZED], job.windows[: args.windows])
    errors = residual_errors(units, models, job.arch.norms, inputs)
    scored = [Unit(u.modules, tuple(Option(o.fmt, o.bytes, errors[(u.modules, o.fmt)]) for o in u.options))
              for u in units]
    weights = sum(torch.Size(job.reader.info(m + ".weight").shape).numel() for m in modules)
    uniform = sum(unit.options[0].bytes for unit in units)
    folders = {"uniform 4-bit": probe / f"uniform-{base.tag}"}
    for extra in [float(x) for x in args.extra.split(",")]:
        formats = {m: o.fmt for u, o in zip(scored, choose(scored, uniform + int(extra * weights // 8)))
                   for m in u.modules if o.fmt != base}
        counts = {tag: sum(f.tag == tag for f in formats.values()) for tag in sorted({f.tag for f in formats.values()})}
        print(f"budget +{extra:g} bpw (residual): {counts}", flush=True)
        folders[f"budget +{extra:g} bpw (residual)"] = folder = probe / f"budget-{extra:g}"
        if not args.choose_only:
            write_checkpoint(job, formats, folder, allow_split=True)
    if args.choose_only:
        return
    scores = bm.evaluate_variants(bm.MODELS[args.model][0], folders, solve_args)
    uniform_score = scores["uniform 4-bit"]
    for label, s in scores.items():
        print(f"| {label} | {s['ppl_quantized']:.3f} | {s['ppl_delta']:+.3f} | "
              f"{s['ppl_delta'] / uniform_score['ppl_delta']:.3f} | {s['kld']['mean']:.4f} | "
              f"{s['kld']['mean'] / uniform_score['kld']['mean']:.3f} | {100 * s['same_top']:.1f}% |")


if __name__ == "__main__":
    main()
