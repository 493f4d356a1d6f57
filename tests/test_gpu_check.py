"""The prepared GPU check (benchmarks/gpu.py) rehearsed on the CPU, so that it runs the day a GPU is lent."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_reduced_on_the_cpu_and_writes_its_section(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    benchmarks = tmp_path / "BENCHMARKS.md"
    results = gpu_check.main(["--reduced", "--device", "cpu", "--phi4-layers", "1", "--work", str(tmp_path),
                              "--benchmarks", str(benchmarks), "--json", str(tmp_path / "gpu.json")])

    assert json.loads((tmp_path / "gpu.json").read_text()) == results
    (run,) = results["quantize"]
    assert [s["done"] for s in run["steps"] if s["stage"] == "quantize"][-1] == 1  # every decoder layer recorded
    assert run["seconds_per_layer"] > 0 and run["predicted"]["allocated_bytes"] > 0
    assert run["peak_allocated_bytes"] is None  # no CUDA allocator on the CPU
    (scored,) = results["eval"]
    assert math.isfinite(scored["ppl"]) and scored["kld"] < 0.1  # a working 4-bit model, not noise
    text = benchmarks.read_text()
    assert "<!-- gpu-reduced:begin -->" in text and "python benchmarks/gpu.py --reduced" in text
    assert "Phi-4 shape, 1 layers" in text
    solve = results["solve"]  # the down_proj-shaped solve, timed as a whole and its factorisation alone
    assert solve["shape"] == [512, 1792] and solve["solve_s"] > 0 and solve["sweep_us_per_column"] >= 0
    assert "column sweep" in text
