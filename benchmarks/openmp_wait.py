"""How long an idle OpenMP thread should spin before it sleeps: GPTQ's time under each wait setting.

    python benchmarks/openmp_wait.py                       # quiet, then beside 2 busy processes; BENCHMARKS.md
    python benchmarks/openmp_wait.py --busy 0 --repeats 1  # quiet only, one run each

Each run is `benchmarks/phases.py` (GPTQ 4-bit g64 on SmolLM2's first layers, c4 windows) in a child process
whose environment holds only the setting under test, the settings taken in turn within each repeat so that a
drift of the machine's speed spreads over all of them. "Busy" runs start BUSY processes that each keep a core
looping in Python, as other jobs on a shared machine would. The default lowbit chose (lowbit/__init__.py) is
the one with no variable set here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.markdown import replace_section  # noqa: E402

OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SETTINGS = {  # label -> the variables set (lowbit/__init__.py fills in its default where none is)
    "never spin (OMP_WAIT_POLICY=PASSIVE)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "3,000 spins": {"GOMP_SPINCOUNT": "3000"},
    "10,000 spins (lowbit's default)": {},
    "300,000 spins (libgomp's default)": {"GOMP_SPINCOUNT": "300000"},
}


def one_run(setting: dict, args, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES} | setting
    command = [sys.executable, str(REPO / "benchmarks" / "phases.py"), "--layers", str(args.layers),
               "--nsamples", str(args.nsamples), "--label", out.name, "--json", str(out)]
    subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True)
    result = json.loads(out.read_text())
    return {"wall_s": result["wall_s"], "cpu_s": result["cpu_s"], "passes_s": result["phases"]["window passes"]["wall_s"]}


def measure(busy: int, args, work: Path) -> dict[str, list[dict]]:
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        runs: dict[str, list[dict]] = {label: [] for label in SETTINGS}
        for repeat in range(args.repeats):
            for index, (label, setting) in enumerate(SETTINGS.items()):
                runs[label].append(one_run(setting, args, work / f"busy{busy}-repeat{repeat}-setting{index}.json"))
                print(f"  busy {busy}, {label}: {runs[label][-1]['wall_s']:.1f} s", flush=True)
        return runs
    finally:
        for loop in loops:
            loop.kill()


def render(results: dict[int, dict[str, list[dict]]], args, command: str) -> str:
    lines = [f"GPTQ 4-bit g64 on SmolLM2-135M's first {args.layers} decoder layers, {args.nsamples} x 512 c4 windows, "
             f"CPU, {os.cpu_count()} cores, torch's default thread count; each figure one child process "
             f"(`benchmarks/phases.py`). 'wall / fastest' compares medians within one load.", "",
             "| other busy processes | setting | wall s, each run | median wall s | wall / fastest | median CPU s | "
             "median window passes s |", "|---|---|---|---|---|---|---|"]
    for busy, runs in results.items():
        medians = {label: statistics.median(r["wall_s"] for r in rs) for label, rs in runs.items()}
        fastest = min(medians.values())
        for label, rs in runs.items():
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
            lines.append(f"| {busy} | {label} | {walls} | {medians[label]:.1f} | "
                         f"{medians[label] / fastest:.2f} | {statistics.median(r['cpu_s'] for r in rs):.1f} | "
                         f"{statistics.median(r['passes_s'] for r in rs):.1f} |")
    lines += ["", f"Produced by: `{command}`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the second set of runs (0: none)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    command = "python benchmarks/openmp_wait.py " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as work:
        results = {busy: measure(busy, args, Path(work)) for busy in dict.fromkeys([0, args.busy])}
    replace_section(args.output, "openmp-wait", "OpenMP threads: how long an idle one spins before it sleeps",
                    render(results, args, command.strip()))


if __name__ == "__main__":
    main()
