"""Does a finer group make 4-bit round-to-nearest worse on Gemma-3-270M? Weight error and perplexity per group size.

Every decoder Linear is rounded with lowbit's own RTN (quantize/gptq.py rtn_quantize) at each
group size, in memory, and the model is scored by plain transformers on the first wikitext-2
test windows (the pinned protocol of README.md, shorter windows).

    PYTHONPATH=. python benchmarks/gemma_groups.py ~/.cache/lowbit-tests/gemma3-270m-bf16 --windows 4 --seqlen 512
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from lowbit.quantize.gptq import GPTQConfig, rtn_quantize

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def wikitext_windows(tokenizer, windows: int, seqlen: int) -> torch.Tensor:
    text = "\n\n".join(WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n"))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[: windows * seqlen].reshape(windows, seqlen)


def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    return math.exp(nll / count)


def round_linears(model, original: dict[str, torch.Tensor], group_size: int, bits: int) -> float:
    """Replace every decoder Linear's weight by its RTN; returns the relative weight error over all of them."""
    error, norm = 0.0, 0.0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = original[name]
            q = rtn_quantize(w, GPTQConfig(bits=bits, group_size=group_size)).dequantize()
            module.weight.data = q.to(module.weight.dtype)
            error += float((w - q).square().sum())
            norm += float(w.square().sum())
    return error / norm


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groups", default="128,64,32")
    args = parser.parse_args()
    folder = args.model.expanduser()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = wikitext_windows(tokenizer, args.windows, args.seqlen)
    original = {n: m.weight.detach().clone() for n, m in model.model.layers.named_modules()
                if isinstance(m, torch.nn.Linear)}
    print(f"base: perplexity {perplexity(model, windows):.2f}", flush=True)
    for group_size in (int(g) for g in args.groups.split(",")):
        error = round_linears(model, original, group_size, args.bits)
        print(f"rtn {args.bits}-bit g{group_size}: relative weight error {error:.5f}, "
              f"perplexity {perplexity(model, windows):.2f}", flush=True)


if __name__ == "__main__":
    main()
