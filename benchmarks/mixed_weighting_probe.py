"""A probe of the size budget's error weightings, on the candidates benchmarks/mixed.py keeps (notes, not the record).

It reuses benchmarks/mixed.py's one solve per model (64 x 512 c4 windows, lowbit's defaults: scale search,
act-order with static groups) and its variants, and scores them on the same wikitext-2 windows. The
"update" weighting here takes each sublayer's share of the residual stream (steps.UpdateShare)
from the BASE model on 4 c4 windows of 512, because the solve it reuses predates the loop recording it;
"sqrtupdate" is its square root. The product's "update" measures the same share in the layer loop, on the
quantized stream.

    python benchmarks/mixed_weighting_probe.py --model smollm2 --weightings relative,update,sqrtupdate
    python benchmarks/mixed_weighting_probe.py --model gemma3 --weightings relative,update --no-rules
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmarks.mixed as bm  # noqa: E402
from lowbit.quantize import assemble, mixed  # noqa: E402
from lowbit.quantize.steps import UpdateShare  # noqa: E402


def base_shares(model: Path, windows: int = 4, seqlen: int = 512) -> list[tuple[float, float]]:
    """Per layer, (attention's, the MLP's) mean over tokens of ||u||^2 / ||h + u||^2 on the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lines = [json.loads(line)["text"] for line in open(REPO.parent / "shared/data/c4/c4-sample.jsonl")][:300]
    ids = tokenizer("\n\n".join(lines), return_tensors="pt").input_ids[:, : windows * seqlen].reshape(windows, seqlen)
    layers, mids, outs = net.model.layers, {}, {}
    for i, layer in enumerate(layers):  # the stream after attention is the MLP's pre-norm input
        norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        norm.register_forward_hook(lambda mod, inp, out, i=i: mids.__setitem__(i, inp[0]))
        layer.register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hidden = net(ids, output_hidden_states=True).hidden_states

    def share(before, after):
        measured = UpdateShare()
        measured.add(before, after - before)
        return measured.total / measured.tokens

    return [(share(hidden[i], mids[i]), share(mids[i], outs[i])) for i in range(len(layers))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=sorted(bm.MODELS))
    parser.add_argument("--weightings", default="relative,update")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--no-rules", action="store_true", help="only uniform and the budget rows")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "mixed")
    args = parser.parse_args()
    solve = argparse.Namespace(nsamples=64, seqlen=512, no_scale_search=False, no_awq_scales=True, out=args.out,
                               eval_windows=args.eval_windows, eval_seqlen=512, fresh=False)
    job = bm.solved_job(args.model, solve)
    shares = base_shares(bm.MODELS[args.model][0])
    arch, stats = job.arch, job.progress["layers"]
    share_of = {id(stats[arch.layer_prefix(i) + name]): shares[i][0 if g < 2 else 1]
                for i in range(arch.num_layers) for g, group in enumerate(arch.groups) for name in group}
    score_of = assemble.score_of

    def weighted(settings, n, k, dense, entry, weighting="relative"):
        if weighting == "relative":
            return score_of(settings, n, k, dense, entry, weighting)
        weight = share_of[id(entry)] ** (0.5 if weighting == "sqrtupdate" else 1.0)
        score = score_of(settings, n, k, dense, entry, "relative")
        return mixed.LinearScore(score.bytes, {fmt: weight * e for fmt, e in score.errors.items()})

    assemble.score_of = weighted  # the probe's shares in place of the loop's
    chosen = bm.variants(job, args.weightings.split(","))
    labels = [label for label in chosen if not (args.no_rules and "rule" in label)]
    folders = {}
    for label in labels:
        folders[label] = args.out / args.model / "probe" / bm.slug(label)
        assemble.write_checkpoint(job, chosen[label][0], folders[label], allow_split=True)
    scores = bm.evaluate_variants(bm.MODELS[args.model][0], folders, solve)
    uniform = scores["uniform 4-bit"]
    print("| variant | bytes | PPL | delta ratio | KLD ratio | same top | 8-bit / 4g32 Linears |")
    print("|---|---|---|---|---|---|---|")
    for label in labels:
        s, (formats, size) = scores[label], chosen[label]
        counts = [sum(1 for f in formats.values() if f.tag.startswith(t)) for t in ("8g", "4g32")]
        print(f"| {label} | {size:,} | {s['ppl_quantized']:.3f} | {s['ppl_delta'] / uniform['ppl_delta']:.3f} | "
              f"{s['kld']['mean'] / uniform['kld']['mean']:.3f} | {100 * s['same_top']:.1f}% | {counts[0]} / {counts[1]} |")


if __name__ == "__main__":
    main()
