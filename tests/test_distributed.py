"""torchrun: two ranks on the CPU (gloo), started by the tests, split the windows and give what one process gives.

Each run is a subprocess with one compute thread (OMP_NUM_THREADS=1), as its single-process twin is:
the same arithmetic in both. SOURCE_DATE_EPOCH pins the manifest's time, so runs of one kind compare byte for
byte. Two ranks add their float32 Hessian sums in rank order, one process sums window by window: the same
products grouped otherwise, so their checkpoints agree up to float32 rounding (solve.HessianAccumulator).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, save_tiny_model
from tests.test_resume import assert_same_files, one_line

EPOCH = "1700000000"
LAYERS = 6


def env() -> dict:
    return {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "OMP_NUM_THREADS": "1"}


def alone(*args) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *map(str, args)]


def torchrun(*args, script: list[str] | None = None) -> list[str]:
    program = script or ["-m", "lowbit.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program,
            *map(str, args)]


def measured(out: Path, *args) -> list[str]:
    """tests/rank_memory.py: the command, and the most tensor bytes it held (per rank) in OUT."""
    return [str(REPO / "tests" / "rank_memory.py"), str(out), *map(str, args)]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def quantize_args(work) -> list[str]:
    model = save_tiny_model(work / "model", layers=LAYERS, hidden=64)
    calibration = work / "calibration.txt"
    calibration.write_text("Each decoder layer is quantized in turn, then its outputs feed the next one. " * 80)
    # 7 windows: blocks of 4 and 3
    # no act-order: its column order follows the Hessian's diagonal, which two ranks sum in another order;
    # on a tiny random model that reordered enough columns to leave 89 % of the codes equal on one Xeon
    # (99 % and more on the Zen 4 this was first measured on). The rest of the path is the same.
    # No AWQ input scales either, for the same reason: each group's alpha is a discrete choice on that Hessian
    # (16 % of the codes moved when one flipped on this model). Their broadcast between ranks is not run here.
    # --fp-targets: each rank pairs its own windows' inputs with the unquantized ones, and saves both streams. Its
    # step moves W by what two ranks sum in another order, and the scale search's clipping is a discrete choice
    # on W: a few of the last layer's down_proj groups took another ratio (scales 14-17 % off), so no search here.
    return ["quantize", str(model), "--method", "gptq", "--nsamples", "7", "--seqlen", "128", "--group-size", "32",
            "--no-act-order", "--no-awq-scales", "--fp-targets", "--no-scale-search",
            "--calibration", str(calibration), "--device", "cpu"]


@pytest.fixture(scope="module")
def single(work, quantize_args) -> tuple[Path, int]:
    """One process's checkpoint, and the most tensor bytes it held."""
    out = work / "single"
    result = run([sys.executable, *measured(work / "single-memory", *quantize_args, "-o", out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((work / "single-memory").read_text())["peak_bytes"]


def assert_same_up_to_rounding(out: Path, reference: Path, model: Path) -> None:
    """The same tensors (names, shapes, dtypes), all but a few codes equal, scales equal to float16 rounding,
    and the same perplexity on the same windows within 0.5 %."""
    from safetensors.torch import load_file

    from lowbit.quantize.pack import unpack_rows

    def tensors(folder: Path) -> dict:
        return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}

    ours, theirs = tensors(out), tensors(reference)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    codes = [k for k in ours if k.endswith(".qweight")]
    equal = sum(int((unpack_rows(ours[k], 4, ours[k].shape[0] * 8) == unpack_rows(theirs[k], 4, ours[k].shape[0] * 8))
                    .sum()) for k in codes)
    total = sum(ours[k].numel() * 8 for k in codes)
    assert equal / total >= 0.99, equal / total  # measured: see BENCHMARKS.md, "Many ranks"
    for k in (k for k in ours if k.endswith(".scales")):
        assert torch.allclose(ours[k].float(), theirs[k].float(), rtol=2e-2), k
    text = out.parent / "perplexity.txt"
    text.write_text("A checkpoint made by two ranks must score what one process's scores. " * 40)
    ppl = []
    for folder in (out, reference):
        scored = run(alone("eval", folder, "--base", model, "--dataset", text, "--seqlen", "64", "--max-windows", "4",
                           "--device", "cpu", "--no-attach", "--json", out.parent / f"{folder.name}-ppl.json"))
        assert scored.returncode == 0, scored.stderr[-2000:]
        ppl.append(json.loads((out.parent / f"{folder.name}-ppl.json").read_text())["ppl_quantized"])
    assert abs(ppl[0] / ppl[1] - 1) <= 0.005, ppl
    print(f"two ranks against one: {equal}/{total} codes equal, perplexity {ppl[0]:.6g} against {ppl[1]:.6g}")


def test_two_ranks_write_the_single_process_checkpoint_holding_less_each(work, quantize_args, single):
    reference, single_peak = single
    out = work / "two-ranks"
    result = run(torchrun(script=measured(work / "rank-memory", *quantize_args, "-o", out)))
    assert result.returncode == 0, result.stderr[-3000:]

    assert_same_up_to_rounding(out, reference, work / "model")
    assert f"wrote {out}" in one_line(result.stdout) and result.stdout.count("wrote") == 1  # rank 0 alone reports
    assert not (work / "two-ranks.lock").exists()
    peaks = [json.loads((work / f"rank-memory.{rank}").read_text())["peak_bytes"] for rank in (0, 1)]
    assert 0 < max(peaks) <= single_peak, (peaks, single_peak)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str]) -> list[subprocess.Popen]:
    """Two ranks as torchrun would start them (its environment), but ours to kill one by one."""
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        rank_env = {**env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        processes.append(subprocess.Popen(alone(*args), cwd=REPO, env=rank_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


def layers_saved(progress: Path) -> int:
    try:
        return json.loads((progress / "progress.json").read_text())["layers_done"]
    except (OSError, ValueError):  # not there yet, or being replaced
        return 0


def test_a_killed_rank_ends_the_run_with_one_line_and_a_rerun_resumes(work, quantize_args, single):
    out = work / "killed"
    progress = work / "killed.partial" / ".lowbit-progress"
    rank0, rank1 = start_ranks([*quantize_args, "-o", str(out)])
    try:
        while layers_saved(progress) < 1:  # a layer committed (its file alone is not: the activations follow)
            assert rank0.poll() is None and rank1.poll() is None, rank0.communicate()[1][-2000:]
            time.sleep(0.02)
        rank1.send_signal(signal.SIGKILL)
        _, stderr = rank0.communicate(timeout=120)
    finally:
        for process in (rank0, rank1):
            if process.poll() is None:
                process.kill()
            process.communicate()

    assert rank0.returncode == 8, stderr[-2000:]  # RankFailed
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "another rank stopped" in lines[0] and "re-run the same command to resume" in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists() and not (work / "killed.lock").exists()
    layers_done = json.loads((progress / "progress.json").read_text())["layers_done"]
    assert 1 <= layers_done < LAYERS

    resumed = run(torchrun(*quantize_args, "-o", out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from layer {layers_done}" in one_line(resumed.stdout)
    assert_same_files(out, work / "two-ranks")  # what the uninterrupted two ranks wrote, to the byte


def test_eval_under_torchrun_gives_the_single_process_report(work, single):
    quantized = single[0]
    model = work / "model"
    text = work / "eval.txt"
    text.write_text("The report of an evaluation must not depend on how many processes computed it. " * 60)
    args = ["eval", quantized, "--base", model, "--dataset", text, "--seqlen", "64", "--max-windows", "5",
            "--chunk-tokens", "24", "--device", "cpu", "--no-attach"]
    one = run(alone(*args, "--json", work / "eval-single.json"))
    two = run(torchrun(*args, "--json", work / "eval-two.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]

    def report(name: str) -> dict:
        data = json.loads((work / name).read_text())
        for varying in ("seconds", "peak_host_bytes"):
            data.pop(varying)
        return data

    single_report, ranks_report = report("eval-single.json"), report("eval-two.json")
    assert single_report["windows"] == 5 and single_report["tokens"] == 5 * 63
    assert ranks_report == single_report


def test_plan_gives_each_rank_its_share_of_the_windows_and_the_whole_hessians(tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests.test_plan import PHI4, write_config

    folder = write_config(tmp_path / "phi4", PHI4)

    def quantize_plan(*options) -> dict:
        result = CliRunner().invoke(app, ["plan", str(folder), "--gpu", "16GiB", "--json", *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["quantize"]

    one, two = quantize_plan(), quantize_plan("--ranks", "2")
    assert two["gpu_peak_bytes"] < one["gpu_peak_bytes"]
    assert one["gpu_phase"] == two["gpu_phase"] == "solve mlp.down_proj"  # an owner's solve, as one process's
    # at that solve a rank holds half the activations, the same Hessian and solver temporaries
    assert two["gpu_parts"]["calibration activations"] * 2 == one["gpu_parts"]["calibration activations"]
    assert two["gpu_parts"]["Hessians"] == one["gpu_parts"]["Hessians"]
    text = CliRunner().invoke(app, ["plan", str(folder), "--gpu", "16GiB", "--ranks", "2"])
    assert "each of 2 ranks" in text.stdout
    refused = CliRunner().invoke(app, ["plan", str(folder), "--ranks", "200", "--nsamples", "128"])
    assert refused.exit_code == 2 and "ranks must be" in refused.output
