"""Is the asymmetric grid's lead on the test models a property of their source? RTN weight error, symmetric
against asymmetric, on every decoder Linear as stored and with its columns shuffled.

Both test models are dequantized GGUF files whose blocks were stored on affine grids: SmolLM2's Q4_1
(scale and minimum per block of 32) and most of Gemma-3-270M's Q4_K (scale and minimum per sub-block of 32).
Such weights sit off-centre inside each source block, which an asymmetric grid fits and a symmetric one does
not. A fixed random permutation of the input columns keeps every column's values and every row's
distribution but breaks the blocks apart; if the asymmetric grid's lead shrinks there, part of it comes
from the source's format rather than from what a 4-bit grid is worth on a model trained in 16 bits.

    python benchmarks/grid_fit.py --section grid-fit
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.markdown import replace_section  # noqa: E402
from benchmarks.quality import MODELS, fits, parse_config  # noqa: E402
from lowbit.quantize.checkpoint import SafetensorsCheckpoint  # noqa: E402
from lowbit.quantize.gptq import GPTQConfig, rtn_quantize  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def relative_error(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> float:
    """||W - RTN(W)||^2 / ||W||^2 on lowbit's grid (min/max, no scale search)."""
    q = rtn_quantize(w, GPTQConfig(bits=bits, group_size=group_size, sym=sym)).dequantize()
    return float((w - q).square().sum() / w.square().sum())


def mean_offset(w: torch.Tensor, block: int = 32) -> float:
    """Mean over blocks of 32 of |mean| / (max - min): how far off-centre the values of a source block sit."""
    blocks = w.reshape(-1, block)
    spread = (blocks.amax(1) - blocks.amin(1)).clamp_min(1e-30)
    return float((blocks.mean(1).abs() / spread).mean())


def model_rows(folder: Path, bits: int, group_size: int) -> dict:
    reader = SafetensorsCheckpoint(folder)
    names = [n for n in reader.names() if n.endswith(".weight") and any(f".{l}." in n for l in LINEARS)]
    generator = torch.Generator().manual_seed(0)
    ratios, shuffled_ratios, offsets, shuffled_offsets = [], [], [], []
    for name in names:
        w = reader.read(name).float()
        shuffled = w[:, torch.randperm(w.shape[1], generator=generator)]
        ratios.append(relative_error(w, bits, group_size, False) / relative_error(w, bits, group_size, True))
        shuffled_ratios.append(relative_error(shuffled, bits, group_size, False)
                               / relative_error(shuffled, bits, group_size, True))
        offsets.append(mean_offset(w))
        shuffled_offsets.append(mean_offset(shuffled))
    return {"linears": len(names), "ratio": statistics.median(ratios), "shuffled_ratio": statistics.median(shuffled_ratios),
            "offset": statistics.mean(offsets), "shuffled_offset": statistics.mean(shuffled_offsets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default="4g64,4g128,3g64")
    parser.add_argument("--section", help="write this BENCHMARKS.md section")
    args = parser.parse_args()
    lines = ["| model | config | Linears | asym / sym weight error, as stored (median) | the same, columns shuffled | "
             "block offset, as stored | block offset, shuffled |", "|---|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        for config in args.configs.split(","):
            if not fits(MODELS[model], config):  # the group size must divide every Linear's inputs (SmolLM2: not 128)
                continue
            row = model_rows(MODELS[model], *parse_config(config))
            lines.append(f"| {model} | {config} | {row['linears']} | {row['ratio']:.3f} | {row['shuffled_ratio']:.3f} | "
                         f"{row['offset']:.4f} | {row['shuffled_offset']:.4f} |")
            print(lines[-1], flush=True)
    body = (__doc__.split("\n\n    python")[0] + "\n\n"
            "'asym / sym': lowbit's RTN weight error on the asymmetric grid over that on the symmetric one (below 1: the "
            "asymmetric grid fits better). 'block offset': the mean over blocks of 32 input columns of |mean| / "
            "(max - min).\n\n" + "\n".join(lines) + "\n\nProduced by: `python benchmarks/grid_fit.py "
            + " ".join(sys.argv[1:]) + "`\n")
    if args.section:
        replace_section(REPO / "BENCHMARKS.md", args.section,
                        "The asymmetric grid on the test models: their source formats (grid-fit)", body)


if __name__ == "__main__":
    main()
