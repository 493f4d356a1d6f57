"""What a size budget's choice is worth next to the best choice: every unit promoted to 8 bits, one at a time.

`--target-bpw` (quantize/mixed.py) ranks its units (one projection group of one layer) by the error the
layer loop measures, weighted by the sublayer's share of the residual stream. This script measures what
each 8-bit promotion really buys: from uniform 4-bit (lowbit's defaults, the candidates of one
benchmarks/mixed.py solve), it puts one unit in 8 bits, runs the model from that unit's layer on, and
takes the KLD against the bf16 base on held-out c4 windows (seed 1; the solve calibrated on seed 0).

It then asks how much of that KLD a greedy by each weighting's predicted gain per byte captures within a
byte budget, against the best possible pick of the same single promotions (the measured gains, greedy
per byte), at the bytes of +0.25 and +0.5 bits per weight. Gains of single promotions need not add up;
the recorded budget rows (benchmarks/mixed.py) score real mixed checkpoints.

    python benchmarks/mixed_ablation.py --models gemma3,smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.markdown import replace_section  # noqa: E402
from benchmarks.mixed import MODELS, solved_job  # noqa: E402
from lowbit.calibration.windows import CalibrationConfig  # noqa: E402
from lowbit.quantize.assemble import mixed_units, write_checkpoint  # noqa: E402
from lowbit.quantize.loader import load_dequantized_model  # noqa: E402
from lowbit.quantize.mixed import WEIGHTINGS  # noqa: E402
from lowbit.quantize.pack import LinearFormat  # noqa: E402

KINDS = ("q/k/v", "o", "gate/up", "down")


def written(job, root: Path) -> tuple[Path, Path]:
    """Uniform 4-bit and every unit in 8 bits, assembled from the solve's candidates (once)."""
    eight = LinearFormat(8, job.settings.group_size)
    folders = {}
    for name, formats in (("uniform", {}), ("all-8-bit", {m: eight for u in mixed_units(job) for m in u.modules})):
        folders[name] = root / name
        if not (folders[name] / "lowbit_manifest.json").exists():
            write_checkpoint(job, formats, folders[name], allow_split=True)
    return folders["uniform"], folders["all-8-bit"]


def layer_inputs(model, ids: torch.Tensor) -> tuple[list, list, list]:
    """Per layer and window: the hidden states entering it and its other call arguments; and the logits."""
    layers = model.model.layers
    hidden, kwargs = [[] for _ in layers], [[] for _ in layers]

    def catch(i):
        def hook(module, args, kw):
            hidden[i].append(args[0] if args else kw["hidden_states"])
            kwargs[i].append({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "cache")})
        return hook

    handles = [layer.register_forward_pre_hook(catch(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        logits = [model(ids[w : w + 1]).logits[0] for w in range(ids.shape[0])]
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs, logits


def per_token_errors(uniform, eight, ids: torch.Tensor) -> dict[str, float]:
    """Per decoder Linear: the mean over tokens of ||y4 - y8||^2 / ||y8||^2, y4 its uniform 4-bit output and y8 its
    8-bit candidate's on the same input (the uniform model's), as a per-token stand-in for the relative output
    error the layer loop measures over all tokens at once."""
    sums: dict[str, list[float]] = {}

    def measure(name, eight_weight):
        def hook(module, args, out):
            y8 = torch.nn.functional.linear(args[0], eight_weight)
            error = (out - y8).float().square().sum(-1) / y8.float().square().sum(-1).clamp_min(1e-30)
            total = sums.setdefault(name, [0.0, 0])
            total[0], total[1] = total[0] + float(error.sum()), total[1] + error.numel()
        return hook

    eights = dict(eight.named_modules())
    handles = [module.register_forward_hook(measure(name, eights[name].weight.data))
               for name, module in uniform.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name]
    try:
        for w in range(ids.shape[0]):
            uniform(ids[w : w + 1])
    finally:
        for handle in handles:
            handle.remove()
    return {name.split(".layers.", 1)[1]: total / count for name, (total, count) in sums.items()}  # "i.self_attn.q_proj"


def kld(base_logprobs: list[torch.Tensor], logits: list[torch.Tensor]) -> list[float]:
    """Per window, the mean over its tokens of KL(base || quantized)."""
    out = []
    for base, q in zip(base_logprobs, logits):
        p = base.float()
        out.append(float((p.exp() * (p - torch.log_softmax(q.float(), -1))).sum(-1).mean()))
    return out


def logits_from(model, start: int, hidden, kwargs) -> list[torch.Tensor]:
    out = []
    for w in range(len(hidden[start])):
        x = hidden[start][w]
        for j in range(start, len(model.model.layers)):
            x = model.model.layers[j](x, **kwargs[j][w])
            x = x[0] if isinstance(x, tuple) else x
        out.append(model.lm_head(model.model.norm(x))[0])
    return out


def ablate(name: str, args) -> dict:
    record = args.out / name / f"ablation-{args.windows}x{args.seqlen}-seed{args.seed}.json"
    if record.exists() and not args.fresh:
        return json.loads(record.read_text())
    job = solved_job(name, argparse.Namespace(nsamples=64, seqlen=512, no_scale_search=False, no_awq_scales=False,
                                              out=args.out))
    uniform_folder, eight_folder = written(job, args.out / name / "ablation")
    uniform, eight = load_dequantized_model(uniform_folder), load_dequantized_model(eight_folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(MODELS[name][0], dtype=torch.float32)

    tokenizer = AutoTokenizer.from_pretrained(MODELS[name][0])
    ids, _ = CalibrationConfig(source="c4", nsamples=args.windows, seqlen=args.seqlen, seed=args.seed).build(tokenizer)
    units = {w: mixed_units(job, w) for w in WEIGHTINGS}
    eight_format = LinearFormat(8, job.settings.group_size)
    weights = sum(math.prod(job.reader.info(m + ".weight").shape) for u in units[WEIGHTINGS[0]] for m in u.modules)
    rows = []
    with torch.no_grad():
        base_logprobs = [torch.log_softmax(base(ids[w : w + 1]).logits[0].float(), -1).to(torch.bfloat16)
                         for w in range(ids.shape[0])]
        del base
        calibration, _ = CalibrationConfig(source="c4", nsamples=args.windows, seqlen=args.seqlen, seed=0).build(tokenizer)
        per_token = per_token_errors(uniform, eight, calibration)
        hidden, kwargs, logits = layer_inputs(uniform, ids)
        uniform_klds = kld(base_logprobs, logits)
        uniform_kld = sum(uniform_klds) / len(uniform_klds)
        print(f"{name}: uniform 4-bit KLD {uniform_kld:.4f}", flush=True)
        for index, unit in enumerate(units[WEIGHTINGS[0]]):
            layer = int(unit.modules[0].split(".layers.")[1].split(".")[0])
            names = [m.split(f".layers.{layer}.", 1)[1] for m in unit.modules]
            kept = {}
            for sub in names:
                linear = uniform.model.layers[layer].get_submodule(sub)
                kept[sub], linear.weight.data = linear.weight.data, eight.model.layers[layer].get_submodule(sub).weight.data
            promoted = kld(base_logprobs, logits_from(uniform, layer, hidden, kwargs))
            for sub, weight in kept.items():
                uniform.model.layers[layer].get_submodule(sub).weight.data = weight
            gains = [u - p for u, p in zip(uniform_klds, promoted)]
            row = {"layer": layer, "kind": KINDS[index % len(KINDS)], "gain": sum(gains) / len(gains), "gains": gains}
            for w in WEIGHTINGS:  # the bytes are the same under every weighting; the errors are not
                options = units[w][index].options
                to_eight = next(o for o in options if o.fmt == eight_format)
                row[w] = options[0].error - to_eight.error
            row["bytes"] = to_eight.bytes - options[0].bytes
            share = job.progress["layers"][unit.modules[0]].get("update_share", 1.0)
            row["per-token"] = share * sum(per_token[m.split(".layers.", 1)[1]] for m in unit.modules)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"uniform_kld": uniform_kld, "weights": weights, "rows": rows}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result))
    return result


def greedy_gain(rows: list[dict], predicted: list[float], budget: int, measured: list[float] | None = None) -> float:
    """The measured gain (by default each row's mean) of the promotions a greedy by predicted gain per byte
    picks within budget bytes."""
    measured = measured or [r["gain"] for r in rows]
    left, gain = budget, 0.0
    for i in sorted(range(len(rows)), key=lambda i: -predicted[i] / rows[i]["bytes"]):
        if rows[i]["bytes"] <= left:
            left, gain = left - rows[i]["bytes"], gain + measured[i]
    return gain


def held_out_best(rows: list[dict], budget: int) -> float:
    """The best single promotions without the luck of the windows: picked by their gains on one half of the
    windows, scored on the other half (both ways, averaged)."""
    halves = []
    for row in rows:
        n = len(row["gains"]) // 2
        halves.append((sum(row["gains"][:n]) / n, sum(row["gains"][n:]) / (len(row["gains"]) - n)))
    first, second = [h[0] for h in halves], [h[1] for h in halves]
    return (greedy_gain(rows, first, budget, second) + greedy_gain(rows, second, budget, first)) / 2


def rank_correlation(a: list[float], b: list[float]) -> float:
    def ranks(values):
        out = [0] * len(values)
        for rank, i in enumerate(sorted(range(len(values)), key=lambda i: values[i])):
            out[i] = rank
        return out

    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def markdown(results: dict, args, command: str) -> str:
    lines = [
        f"From uniform 4-bit (lowbit's defaults; the candidates of one `benchmarks/mixed.py` solve: c4 64 x 512, "
        f"seed 0), each unit (one projection group of one layer) is put in 8 bits alone and the model is run from "
        f"its layer on; 'gain' is how much that lowers the KLD against the bf16 base on {args.windows} held-out c4 "
        f"windows of {args.seqlen} tokens (seed {args.seed}). 'captured' is the gain of the promotions a greedy "
        f"picks by gain per byte within the budget's extra bytes: by each weighting's predicted gain (the error "
        f"drop the layer loop measured, quantize/mixed.py; 'per-token': update's share times the mean over tokens "
        f"of each Linear's relative error against its 8-bit candidate, measured here on {args.windows} c4 windows drawn "
        f"with the solve's seed, 0, a stand-in for an error the loop sums over all tokens at once), or by the measured gains themselves ('best "
        f"single promotions': on the same windows, which flatters it; the row below it picks on half of the windows "
        f"and scores on the other half). Single gains need not add up; the budget rows of benchmarks/mixed.py score real "
        f"mixed checkpoints. CPU, {torch.get_num_threads()} threads.", ""]
    for name, result in results.items():
        rows, uniform = result["rows"], result["uniform_kld"]
        gains = [r["gain"] for r in rows]
        budgets = {f"+{x:g} bpw": int(x * result["weights"] // 8) for x in (0.25, 0.5)}
        lines += [f"### {name}: uniform 4-bit KLD {uniform:.4f} on these windows; {len(rows)} units, "
                  f"{sum(g < 0 for g in gains)} with a negative gain", "",
                  "| pick by | rank correlation with the measured gain per byte | "
                  + " | ".join(f"captured at {b} (share of uniform's KLD)" for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        picks = {w: [r[w] for r in rows] for w in (*WEIGHTINGS, "per-token") if w in rows[0]}
        picks["best single promotions"] = gains
        for label, predicted in picks.items():
            correlation = rank_correlation([p / r["bytes"] for p, r in zip(predicted, rows)],
                                           [g / r["bytes"] for g, r in zip(gains, rows)])
            captured = [greedy_gain(rows, predicted, b) for b in budgets.values()]
            cells = [f"{c:.4f} ({c / uniform:.1%})" for c in captured]
            lines.append(f"| {label} | {correlation:.2f} | " + " | ".join(cells) + " |")
        if "gains" in rows[0]:
            captured = [held_out_best(rows, b) for b in budgets.values()]
            cells = [f"{c:.4f} ({c / uniform:.1%})" for c in captured]
            lines.append("| best single promotions, picked on half of the windows, scored on the other | | "
                         + " | ".join(cells) + " |")
        lines += ["", "| unit | measured gain, sum | " + " | ".join(f"{w}'s predicted, sum" for w in WEIGHTINGS)
                  + " | measured / update |", "|---|---|" + "---|" * len(WEIGHTINGS) + "---|"]
        for kind in KINDS:
            of = [r for r in rows if r["kind"] == kind]
            measured = sum(r["gain"] for r in of)
            lines.append(f"| {kind} | {measured:.4f} | " + " | ".join(f"{sum(r[w] for r in of):.4f}" for w in WEIGHTINGS)
                         + f" | {measured / sum(r['update'] for r in of):.1f} |")
        half = len(rows) // 2
        early, late = rows[:half], rows[half:]
        ratio = [sum(r["gain"] for r in part) / sum(r["update"] for r in part) for part in (early, late)]
        lines += ["", f"Measured over update's predicted gain: {ratio[0]:.1f} in the first half of the layers, "
                  f"{ratio[1]:.1f} in the second.", ""]
    lines.append(f"Produced by: `{command}`")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma3,smollm2")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1, help="of the held-out c4 windows (the solve's is 0)")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "mixed")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {name: ablate(name, args) for name in args.models.split(",")}
    command = "python benchmarks/mixed_ablation.py " + shlex.join(sys.argv[1:])
    text = markdown(results, args, command)
    print(text)
    if not args.no_write:
        replace_section(REPO / "BENCHMARKS.md", "mixed-ablation",
                        "A size budget's picks against the best single 8-bit promotions (ablation)", text)


if __name__ == "__main__":
    main()
