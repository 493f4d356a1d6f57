"""What --fast-matmul does on this machine: the window passes' and Hessian sums' products at each float32 precision.

    python benchmarks/matmul_precision.py            # writes the "fast-matmul" section of BENCHMARKS.md
    python benchmarks/matmul_precision.py --no-write

For the GEMMs of one 512-token window through a SmolLM2 and a Gemma-3-270M layer (x W^T for each projection,
and one Hessian band x^T x), time each at torch's float32 matmul precision "highest" (--exact-matmul) and
"medium" (--fast-matmul, quantize/stream.py: matmul_precision), and say whether the two give the same bits
(they do where the CPU has no bfloat16 path: then the setting changes nothing). The repeats alternate the two
settings so that a drift of the machine's speed falls on both.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lowbit  # noqa: E402,F401  (its OpenMP setting precedes torch's import)
import torch  # noqa: E402

from benchmarks.markdown import replace_section  # noqa: E402
from lowbit.quantize.stream import matmul_precision  # noqa: E402

TOKENS = 512
# (model, what, rows x inner x columns): one window's products
SHAPES = [
    ("SmolLM2", "gate/up projection", (TOKENS, 576, 3072)),
    ("SmolLM2", "down projection", (TOKENS, 1536, 576)),
    ("SmolLM2", "down_proj Hessian band", (256, TOKENS, 1536)),
    ("Gemma-3-270M", "gate/up projection", (TOKENS, 640, 4096)),
    ("Gemma-3-270M", "down projection", (TOKENS, 2048, 640)),
    ("Gemma-3-270M", "down_proj Hessian band", (256, TOKENS, 2048)),
]


def cpu_description() -> str:
    """The CPU's model name and which of the instruction sets that decide "medium"'s path it has."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.processor() or 'unknown CPU'} (instruction sets unknown)"
    field = lambda key: next((l.split(":", 1)[1].strip() for l in lines if l.startswith(key)), "")  # noqa: E731
    flags = field("flags").split()
    found = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{field('model name') or 'unknown CPU'} ({', '.join(found) or 'none of amx_bf16, avx512_bf16, avx512f, avx2'})"


def time_product(a: torch.Tensor, b: torch.Tensor, fast: bool, repeats: int) -> tuple[float, torch.Tensor]:
    with matmul_precision(fast):
        out = a @ b
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return (time.perf_counter() - started) / repeats, out


def measure(repeats: int, rounds: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for model, what, (m, k, n) in SHAPES:
        a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
        exact_s, fast_s = [], []
        for _ in range(rounds):
            seconds, exact = time_product(a, b, False, repeats)
            exact_s.append(seconds)
            seconds, fast = time_product(a, b, True, repeats)
            fast_s.append(seconds)
        flops = 2 * m * k * n
        rows.append({"model": model, "what": what, "shape": f"[{m}, {k}] x [{k}, {n}]",
                     "exact_gflops": flops / statistics.median(exact_s) / 1e9,
                     "fast_gflops": flops / statistics.median(fast_s) / 1e9,
                     "identical": torch.equal(exact, fast),
                     "max_rel_diff": float((exact - fast).abs().max() / exact.abs().max())})
    return rows


def section(rows: list[dict], command: str) -> str:
    lines = [f"CPU: {cpu_description()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
             "Each product timed at the median of alternating rounds.", "",
             "| model | product | shape | highest (exact): GFLOP/s | medium (fast): GFLOP/s | speed-up | same bits | "
             "largest difference / largest value |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['what']} | {r['shape']} | {r['exact_gflops']:.0f} | {r['fast_gflops']:.0f} | "
                     f"{r['fast_gflops'] / r['exact_gflops']:.2f}x | {'yes' if r['identical'] else 'no'} | "
                     f"{r['max_rel_diff']:.1e} |")
    lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="products per timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timings per setting")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = measure(args.repeats, args.rounds)
    command = "python benchmarks/matmul_precision.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    body = section(rows, command)
    print(body)
    if not args.no_write:
        replace_section(REPO / "BENCHMARKS.md", "fast-matmul-products",
                        "fast-matmul: the products at each float32 matmul precision", body)


if __name__ == "__main__":
    main()
