"""A probe of the size budget's error measure: over all tokens at once, or per token (notes, not the record).

`--target-bpw` (quantize/mixed.py) scores each candidate format of a Linear by its relative output error over
all calibration tokens at once, ||(W - Q) X||^2 / ||W X||^2. A few tokens with massive activations can make up
most of ||W X||^2 (SmolLM2's down_proj from layer 12 on), and then that error says little about the other
tokens. This probe scores every candidate of benchmarks/mixed.py's one solve per model (its kept tensors)
three ways on the same calibration windows, and spends +0.25 bits per weight by each (the "weights"
weighting: error times the Linear's number of weights):

- "all tokens": sum_t ||e_t||^2 / sum_t ||y_t||^2, what the layer loop measures (a control: these windows
  against the loop's);
- "per token": the mean over tokens of ||e_t||^2 / ||y_t||^2;
- "per token, input-normalised": sum_t ||e_t||^2 / ||x_t||^2 over sum_t ||y_t||^2 / ||x_t||^2, which the
  layer loop could sum as a second K x K matrix per group (x x^T / ||x||^2) without computing any output.

e_t = y_t(candidate) - y_t(8-bit) and y_t = y_t(8-bit) on the uniform 4-bit model's inputs: the 8-bit candidate
stands in for the float weights in the basis of the folded AWQ input scales (its own error is about 1/256 of
4-bit's). Each budget is then written from the same candidates and scored as benchmarks/mixed.py scores.

    python benchmarks/mixed_token_probe.py --models smollm2,gemma3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmarks.mixed as bm  # noqa: E402
from lowbit.calibration.windows import CalibrationConfig  # noqa: E402
from lowbit.quantize.assemble import mixed_units, write_checkpoint  # noqa: E402
from lowbit.quantize.loader import load_dequantized_model  # noqa: E402
from lowbit.quantize.mixed import Option, Unit, choose, format_bytes  # noqa: E402
from lowbit.quantize.pack import LinearFormat  # noqa: E402

MEASURES = ("all tokens", "per token", "per token, input-normalised")


def candidate_models(job, root: Path) -> dict[LinearFormat, torch.nn.Module]:
    """Every quantized candidate format applied to every Linear (where it packs), each as a dequantized model."""
    units = mixed_units(job)
    formats = [o.fmt for o in units[0].options if o.fmt.quantized]
    models = {}
    for fmt in formats:
        folder = root / f"all-{fmt.tag}"
        if not (folder / "lowbit_manifest.json").exists():
            chosen = {m: fmt for u in units for m in u.modules if any(o.fmt == fmt for o in u.options)}
            write_checkpoint(job, chosen, folder, allow_split=True)
        models[fmt] = load_dequantized_model(folder)
    return models


def measured_errors(models: dict, base: LinearFormat, eight: LinearFormat, ids: torch.Tensor) -> dict:
    """{linear name: {format: {measure: error}}} on the base model's inputs, against the 8-bit candidate."""
    sums: dict[str, dict] = {}
    others = {fmt: dict(m.named_modules()) for fmt, m in models.items()}

    def measure(name):
        def hook(module, args):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            inv_x = 1 / x.square().sum(-1).clamp_min(1e-30)
            y8 = x @ others[eight][name].weight.float().T
            y_energy = y8.square().sum(-1)
            entry = sums.setdefault(name, {"y": 0.0, "y/x": 0.0, "tokens": 0, "errors": {}})
            entry["y"] += float(y_energy.sum())
            entry["y/x"] += float((y_energy * inv_x).sum())
            entry["tokens"] += x.shape[0]
            for fmt in models:
                if fmt == eight or name not in others[fmt]:
                    continue
                e = (x @ others[fmt][name].weight.float().T - y8).square().sum(-1)
                acc = entry["errors"].setdefault(fmt, [0.0, 0.0, 0.0])
                acc[0] += float(e.sum())
                acc[1] += float((e / y_energy.clamp_min(1e-30)).sum())
                acc[2] += float((e * inv_x).sum())
        return hook

    uniform = models[base]
    handles = [module.register_forward_pre_hook(measure(name)) for name, module in uniform.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name]
    try:
        with torch.no_grad():
            for w in range(ids.shape[0]):
                uniform(ids[w : w + 1])
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, entry in sums.items():
        out[name] = {fmt: dict(zip(MEASURES, (a / entry["y"], p / entry["tokens"], n / entry["y/x"])))
                     for fmt, (a, p, n) in entry["errors"].items()}
        out[name][eight] = dict.fromkeys(MEASURES, 0.0)
    return out


def units_by(job, errors: dict, measure: str) -> list[Unit]:
    """The budget's units with each option's error re-measured: the sum over its Linears of weights x error."""
    units = []
    for unit in mixed_units(job):
        options = []
        for option in unit.options:
            if not option.fmt.quantized:
                options.append(Option(option.fmt, option.bytes, 0.0))
                continue
            error = 0.0
            for m in unit.modules:
                n, k = job.reader.info(m + ".weight").shape
                error += n * k * errors[_short(m)][option.fmt][measure]
            options.append(Option(option.fmt, option.bytes, error))
        units.append(Unit(unit.modules, tuple(options)))
    return units


def _short(module: str) -> str:
    """The dequantized model's name of a checkpoint Linear ("model.layers.3.mlp.down_proj")."""
    return "model.layers." + module.split(".layers.", 1)[1]


def probe(name: str, args) -> dict:
    job = bm.solved_job(name, argparse.Namespace(nsamples=64, seqlen=512, no_scale_search=False, no_awq_scales=False,
                                                 no_bos=False, out=args.out))
    root = args.out / name / "token-probe"
    base = LinearFormat(job.settings.bits, job.settings.group_size)
    eight = LinearFormat(8, job.settings.group_size)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bm.MODELS[name][0])
    ids, _ = CalibrationConfig(source="c4", nsamples=args.windows, seqlen=512, seed=0).build(tokenizer)
    models = candidate_models(job, root)
    errors = measured_errors(models, base, eight, ids)
    del models
    recorded = job.progress["layers"]
    ratio = [errors[_short(m)][base]["all tokens"] / recorded[m]["error"] for m in recorded if "error" in recorded[m]]
    print(f"{name}: these windows' all-token error over the loop's, median {sorted(ratio)[len(ratio) // 2]:.3f}")
    infos = {m: job.reader.info(m + ".weight") for u in mixed_units(job) for m in u.modules}
    weights = sum(math.prod(i.shape) for i in infos.values())
    uniform = sum(format_bytes(base, *i.shape, i.dtype.itemsize) for i in infos.values())
    budget = uniform + int(args.extra * weights // 8)
    folders, chosen_counts = {}, {}
    for measure in MEASURES:
        units = units_by(job, errors, measure)
        formats = {m: o.fmt for u, o in zip(units, choose(units, budget)) for m in u.modules}
        label = f"budget +{args.extra:g} bpw ({measure})"
        folders[label] = root / bm.slug(label)
        write_checkpoint(job, formats, folders[label], allow_split=True)
        chosen_counts[label] = {tag: sum(1 for f in formats.values() if f != base and f.tag.startswith(tag))
                                for tag in ("8g", "4g64", "4g32", "16")}
        print(label, chosen_counts[label], flush=True)
    if args.uniform:
        folders = {"uniform 4-bit": root / f"all-{base.tag}", **folders}
    scores = bm.evaluate_variants(bm.MODELS[name][0], folders, argparse.Namespace(
        eval_windows=40, eval_seqlen=512, no_bos=False))
    for label in chosen_counts:
        scores[label]["counts"] = chosen_counts[label]
    return {k: {kk: v[kk] for kk in ("ppl_quantized", "ppl_delta", "kld", "same_top", "counts") if kk in v}
            for k, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--windows", type=int, default=8, help="c4 calibration windows of 512 (seed 0) to measure on")
    parser.add_argument("--extra", type=float, default=0.25, help="bits per weight over uniform 4-bit")
    parser.add_argument("--uniform", action="store_true", help="score uniform 4-bit too")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "mixed")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models.split(","):
        result = probe(name, args)
        print(json.dumps({name: result}, default=str), flush=True)


if __name__ == "__main__":
    main()
