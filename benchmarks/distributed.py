"""Wall and CPU time of `lowbit quantize` with 1 and 2 ranks on the CPU (one thread each), where the time goes,
and the speed-up that projects to N GPUs.

    python benchmarks/distributed.py                      # SmolLM2-135M, GPTQ 4-bit g64, 16 x 512 c4 windows
    python benchmarks/distributed.py --layers 6 --nsamples 16 --no-write

Each run is a child process: `python benchmarks/distributed.py --child ...` for one rank, the same under
`python -m torch.distributed.run --standalone --nproc-per-node 2` for two. In each rank, benchmarks/phases.py's
timers wrap the engine's functions (window passes, Hessian accumulation, solves...) and the exchanges between
ranks; every Linear's solve is timed on its own. The parent takes each run's wall time (process start to exit)
and its children's CPU time, and compares what both runs wrote (bytes, then GPTQ codes).

The projection: window passes and Hessian accumulation (and embedding) split evenly over N ranks; each
group's solves run side by side on their owners (quantize/distributed.py's owner rule), so a group takes
as long as its busiest owner; the rest (tokenizing, reading layers, saving, writing) stays as it is. The
exchanges are left out of it (NVLink moves a 2 MB Hessian in well under a millisecond); the CPU run's own
gloo exchanges are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.phases import C4, SMOLLM2, PhaseClock, first_layers, git_commit, install  # noqa: E402

SPLIT = {"window passes", "Hessian accumulation", "embed windows"}  # phases that divide by N
EXCHANGES = [("sum_rows", "exchange: Hessian sums"), ("broadcast_", "exchange: quantized weights"),
             ("to_primary", "exchange: results to rank 0"), ("send_to_primary", "exchange: hidden states"),
             ("from_primary", "exchange: results to rank 0")]


def child(args) -> None:
    """One rank's run (under torchrun, or alone): phases and per-Linear solve times into args.child."""
    import torch

    from lowbit.calibration.windows import CalibrationConfig
    from lowbit.quantize import distributed, driver
    from lowbit.quantize.driver import QuantizeSettings, RunOptions, quantize_model

    clock = PhaseClock()
    install(clock)
    for attr, phase in EXCHANGES:
        setattr(distributed.Ranks, attr, clock.wrap(getattr(distributed.Ranks, attr), phase))
    solves: list[list] = []
    solve_linear = driver._solve_linear

    def timed_solve(layer, name, *rest, **kwargs):
        start = time.perf_counter()
        try:
            return solve_linear(layer, name, *rest, **kwargs)
        finally:
            solves.append([layer.self_attn.layer_idx, name, time.perf_counter() - start])

    driver._solve_linear = timed_solve
    settings = QuantizeSettings(method="gptq", bits=4, group_size=args.group_size)
    config = CalibrationConfig(source=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    quantize_model(str(args.model), args.output, settings, config, RunOptions(device="cpu", force=True))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    clock.wall["other"] = wall - sum(clock.wall.values())
    clock.cpu["other"] = cpu - sum(clock.cpu.values())
    out = Path(f"{args.child}.{os.environ.get('RANK', '0')}")
    out.write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(),
                               "phases": {p: {"wall_s": clock.wall[p], "cpu_s": clock.cpu[p]} for p in clock.wall},
                               "solves": solves}))


def run(ranks: int, args, model: Path, work: Path) -> dict:
    """One `lowbit quantize` with RANKS processes; its wall and CPU time and each rank's phases."""
    output = work / f"out-{ranks}"
    report = work / f"phases-{ranks}"
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={ranks}"]
    command = [*launcher, str(Path(__file__).resolve()), "--child", str(report), "--model", str(model),
               "--output", str(output), "--calibration", args.calibration, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--group-size", str(args.group_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOURCE_DATE_EPOCH": "1700000000"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=REPO)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    per_rank = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "wall_s": wall, "cpu_s": cpu, "load_before": load, "load_after": os.getloadavg()[0],
            "per_rank": per_rank, "output": str(output)}


def shares(single: dict) -> tuple[float, float, float]:
    """The single rank's CPU seconds in (window-bound phases, solves, the rest): CPU time moves less than
    wall time on a shared machine."""
    phases = single["phases"]
    split = sum(p["cpu_s"] for name, p in phases.items() if name in SPLIT)
    solves = sum(p["cpu_s"] for name, p in phases.items() if name.startswith("solve:"))
    return split, solves, single["cpu_s"] - split - solves


def projected(single: dict, world: int) -> float:
    """CPU-bound seconds of a WORLD-rank run from the 1-rank phases and per-Linear solve times (the docstring)."""
    from lowbit.quantize.distributed import Ranks

    split, solve_total, rest = shares(single)
    scale = solve_total / sum(t for _, _, t in single["solves"])  # each Linear's wall time, as CPU seconds
    ranks = Ranks(0, world)
    critical = 0.0
    by_layer: dict[int, list] = {}
    for layer, name, seconds in single["solves"]:
        by_layer.setdefault(layer, []).append((name, seconds))
    for layer, solves in by_layer.items():
        order = [name for name, _ in solves]
        for group in _groups(order):
            busy = [0.0] * world
            for name, seconds in solves:
                if name in group:
                    busy[ranks.owner(layer, order.index(name))] += seconds * scale
            critical += max(busy)
    return split / world + critical + rest


def _groups(order: list[str]) -> list[set[str]]:
    """The true-sequential groups of a Llama layer, by the Linears' names."""
    kinds = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    return [{n for n in order if n.rsplit(".", 1)[-1] in kind} for kind in kinds]


def agreement(a: Path, b: Path) -> str:
    """How the two checkpoints compare: byte for byte, else how many of their GPTQ codes are equal."""
    from safetensors.torch import load_file

    from lowbit.quantize.pack import unpack_rows

    files = sorted(p.name for p in a.iterdir())
    if files == sorted(p.name for p in b.iterdir()) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files):
        return "byte for byte the same"
    ours, theirs = ({k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}
                    for folder in (a, b))
    equal = total = 0
    for name in (k for k in ours if k.endswith(".qweight")):
        rows = ours[name].shape[0] * 8
        equal += int((unpack_rows(ours[name], 4, rows) == unpack_rows(theirs[name], 4, rows)).sum())
        total += rows * ours[name].shape[1]
    return (f"not byte for byte the same (the Hessian sums are float32, added per rank), with {equal:,} of "
            f"{total:,} codes equal")


def perplexities(outputs: list[Path], model: Path, work: Path, windows: int = 16) -> list[float]:
    """Each checkpoint's perplexity by `lowbit eval`, on the same wikitext-2 windows (16 x 512, one process)."""
    scored = []
    for folder in outputs:
        report = work / f"{folder.name}-eval.json"
        subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", str(folder), "--base", str(model), "--dataset",
                        "wikitext2", "--seqlen", "512", "--max-windows", str(windows), "--device", "cpu",
                        "--no-attach", "--json", str(report)], check=True, cwd=REPO, capture_output=True)
        scored.append(json.loads(report.read_text())["ppl_quantized"])
    return scored


def render(results: list[dict], agreement_line: str, args, model: Path) -> str:
    one = results[0]
    single = one["per_rank"][0]
    lines = [f"`{' '.join(args.command)}` ({git_commit()}): `lowbit quantize {model.name} --method gptq --bits 4 "
             f"--group-size {args.group_size} --calibration {Path(args.calibration).name} --nsamples {args.nsamples} "
             f"--seqlen {args.seqlen} --device cpu`, once alone and once under `torchrun --nproc-per-node 2`, "
             "OMP_NUM_THREADS=1 in each rank. Wall: the command from start to exit (process starts included); "
             "CPU: user + system of all its processes.", "",
             "| ranks | wall s | CPU s (all ranks) | load average before / after |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['ranks']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", f"Speed-up with 2 ranks: **{one['wall_s'] / results[1]['wall_s']:.2f}x** wall. The two checkpoints are "
              f"{agreement_line}.", "",
              "Where each rank's time goes (wall / CPU seconds inside the quantize call; exclusive phases; a rank "
              "waiting for another counts in the exchange it waits in):", "",
              "| phase | 1 rank | " + " | ".join(f"2 ranks: rank {i}" for i in range(len(results[1]["per_rank"]))) + " |",
              "|---|---|" + "---|" * len(results[1]["per_rank"])]
    names = sorted({p for r in results for rank in r["per_rank"] for p in rank["phases"]},
                   key=lambda p: -single["phases"].get(p, {"cpu_s": 0})["cpu_s"])
    for name in names:
        cells = [f"{rank['phases'][name]['wall_s']:.1f} / {rank['phases'][name]['cpu_s']:.1f}"
                 if name in rank["phases"] else "-" for r in results for rank in r["per_rank"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    split, solve_total, rest = shares(single)
    total = single["cpu_s"]
    lines += ["", f"Of the single rank's {total:.1f} CPU s: window passes, Hessian accumulation and embedding "
              f"{split:.1f} s ({100 * split / total:.0f} %, divided by N), solves {solve_total:.1f} s "
              f"({100 * solve_total / total:.0f} %, side by side within each group), the rest {rest:.1f} s "
              "(unchanged). Projected on N GPUs from these proportions (exchanges left out):", "",
              "| N | projected s | speed-up |", "|---|---|---|"]
    for world in (1, 2, 4, 8):
        t = projected(single, world)
        lines.append(f"| {world} | {t:.1f} | {total / t:.2f}x |")
    notes = ["", "The machine's load average is in the first table: on a shared machine wall figures are indicative "
             "only and CPU figures move less; re-run the command on a quiet one. The projection assumes the CPU's "
             "proportions of passes to solves (a GPU's were not measured here); the CPU run's gloo exchanges, mostly "
             "a rank waiting for the owner of a solve ('exchange: quantized weights'), are left out of it.", ""]
    cost = ["", "Each further rank takes away its share of the activations only: the layer, the Hessians (float32 "
            "sums, added in rank order) and an owner's solve are a single process's."]
    return "\n".join(lines + notes + memory_per_rank() + cost)


def memory_per_rank() -> list[str]:
    """`lowbit plan --ranks N` for Phi-4 on GPUs, 128 x 2048 calibration windows: what each rank holds."""
    from benchmarks.scale import PHI4_CONFIG
    from lowbit.quantize.fit import plan
    from lowbit.quantize.plan import GiB, PlanSettings

    lines = ["Memory of each rank, `lowbit plan PHI4 --gpu 80GiB --ranks N` (Phi-4's config, GPTQ 4-bit g128, "
             "128 x 2048 windows, 16-bit compute):", "",
             "| N | GPU peak per rank | at | activations | Hessians |", "|---|---|---|---|---|"]
    for world in (1, 2, 4, 8):
        q = plan(PHI4_CONFIG, PlanSettings(device="cuda"), 80 * GiB, None, world)["quantize"]
        parts = q["gpu_parts"]
        lines.append(f"| {world} | {q['gpu_peak_bytes'] / GiB:.2f} GiB | {q['gpu_phase']} | "
                     f"{parts.get('calibration activations', 0) / GiB:.2f} GiB | {parts.get('Hessians', 0) / GiB:.2f} GiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--layers", type=int, help="only the model's first LAYERS decoder layers")
    parser.add_argument("--calibration", default=str(C4))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "distributed")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--no-write", action="store_true", help="print the section; leave BENCHMARKS.md alone")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    args.command = ["python", "benchmarks/distributed.py", *sys.argv[1:]]
    args.work.mkdir(parents=True, exist_ok=True)
    model = first_layers(args.model, args.layers, args.work) if args.layers else args.model
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        results = [run(ranks, args, model, Path(work)) for ranks in (1, 2)]
        outputs = [Path(r["output"]) for r in results]
        identical = agreement(*outputs)
        if not identical.startswith("byte"):
            one, two = perplexities(outputs, model, Path(work))
            identical += (f"; perplexity on 16 x 512 wikitext-2 windows {two:.4f} (2 ranks) against {one:.4f} "
                          f"(1 rank): {100 * (two / one - 1):+.2f} %")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    body = render(results, identical, args, model)
    print(body)
    if not args.no_write:
        from benchmarks.markdown import replace_section

        replace_section(REPO / "BENCHMARKS.md", "distributed", "Two ranks on the CPU (torchrun, gloo)", body)


if __name__ == "__main__":
    main()
