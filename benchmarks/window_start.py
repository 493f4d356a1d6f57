"""What a window's first token does to a model's perplexity: the same wikitext-2 text scored with the
tokenizer's BOS before every window (lowbit's windows) and without it (the GPTQ reference's), by position.

    python benchmarks/window_start.py                      # both test models, 8 x 2048 windows
    python benchmarks/window_start.py --models gemma3 --windows 40 --seqlen 512

Each window of the plain run is [text tokens t .. t + seqlen) (the reference's first window begins with
the BOS already); the BOS run puts the start tokens (Gemma's BOS) in place of the first text tokens, so
both score the same targets after them. Plain transformers (float32, the base model), one window at a time. The mean NLL is reported per
band of positions, so that it shows whether a missing BOS costs only the first tokens or the whole window.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.markdown import replace_section  # noqa: E402

CACHE = Path.home() / ".cache" / "lowbit-tests"
MODELS = {"smollm2": CACHE / "smollm2-135m-bf16", "gemma3": CACHE / "gemma3-270m-bf16"}
BANDS = ((1, 16), (16, 128), (128, 512), (512, 2048))  # [start, end) of the positions whose token is predicted


def token_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """[windows, seqlen - 1] NLL of token t + 1 given tokens 0..t."""
    rows = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0, :-1].float()
            rows.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none"))
    return torch.stack(rows)


def compare(folder: Path, windows: int, seqlen: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.calibration.windows import start_tokens
    from lowbit.evals.datasets import eval_windows, load_eval_text

    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = start_tokens(tokenizer)
    plain = eval_windows(load_eval_text("wikitext2")[0], tokenizer, seqlen, windows, bos=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = {"start_tokens": start, "windows": plain.shape[0], "seqlen": seqlen}
    if not start:
        return result  # no BOS: lowbit's windows are the plain ones
    with_bos = plain.clone()
    with_bos[:, : len(start)] = torch.tensor(start)  # the start tokens in place of the window's first text tokens
    nll = {"plain": token_nll(model, plain), "bos": token_nll(model, with_bos)}  # the same targets
    for name, values in nll.items():
        result[name] = {"ppl": math.exp(float(values.mean())),
                        "bands": {f"{a}-{min(b, seqlen) - 1}": float(values[:, a - 1 : b - 1].mean())
                                  for a, b in BANDS if a < seqlen - 1}}
    return result


def section(results: dict, command: str) -> str:
    lines = ["The same text tokens scored with and without the BOS before each window (plain transformers, "
             "float32, the base model): perplexity over the same targets, and the mean NLL (nats) "
             "of the targets at each band of positions.", ""]
    for name, r in results.items():
        if "plain" not in r:
            lines += [f"- **{name}**: its tokenizer puts nothing before text, so its windows are the same either way.", ""]
            continue
        bands = list(r["plain"]["bands"])
        lines += [f"**{name}** ({r['windows']} x {r['seqlen']} wikitext-2 windows, start tokens {r['start_tokens']})", "",
                  "| windows | PPL | " + " | ".join(f"NLL at positions {b}" for b in bands) + " |",
                  "|---|---|" + "---|" * len(bands)]
        for key, label in (("plain", "plain text (the GPTQ reference's)"), ("bos", "BOS first (lowbit's)")):
            lines.append(f"| {label} | {r[key]['ppl']:.3f} | " + " | ".join(f"{r[key]['bands'][b]:.3f}" for b in bands) + " |")
        lines.append("")
    lines += [f"Produced by: `{command}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = {}
    for name in args.models.split(","):
        results[name] = compare(MODELS[name], args.windows, args.seqlen)
        print(name, results[name], flush=True)
    command = "python benchmarks/window_start.py " + " ".join(sys.argv[1:])
    if not args.no_write:
        replace_section(REPO / "BENCHMARKS.md", f"window-start-{args.seqlen}",
                        f"Windows that begin as the model is run: the BOS, by position ({args.seqlen} tokens)",
                        section(results, command.strip()))


if __name__ == "__main__":
    main()
