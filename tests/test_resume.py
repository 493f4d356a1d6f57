"""Resume: a killed `lowbit quantize` continues where it stopped, and the result is the same, byte for byte.

SOURCE_DATE_EPOCH pins the manifest's "created" time, so that two runs can
be compared file by file, manifest included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.quantize import driver, writer
from tests.conftest import REPO, save_tiny_model

EPOCH = "1700000000"
RTN = ["--method", "rtn", "--group-size", "32"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    return " ".join(text.split())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_files(a: Path, b: Path) -> None:
    files_a, files_b = folder_bytes(a), folder_bytes(b)
    assert sorted(files_a) == sorted(files_b)
    differ = [name for name in files_a if files_a[name] != files_b[name]]
    assert differ == [], f"files differ: {differ}"


def gptq_args(folder: Path) -> list[str]:
    calibration = folder / "calibration.txt"
    calibration.write_text("Each decoder layer is quantized in turn, then its outputs feed the next one. " * 60)
    return ["--method", "gptq", "--nsamples", "4", "--seqlen", "64", "--group-size", "32",
            "--calibration", str(calibration)]


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


@pytest.fixture(autouse=True)
def one_thread():
    """One compute thread here and in the subprocess: the same arithmetic in both, and no
    spinning threads on a busy machine (ten times faster on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# with the unquantized hidden states saved beside; calibrated NF4's defaults (act-order, fp targets)
@pytest.mark.parametrize("extra", [[], ["--fp-targets"], ["--method", "nf4"]])
def test_killed_run_resumes_to_the_same_bytes(tmp_path, extra):
    model = save_tiny_model(tmp_path / "model", layers=6, hidden=64)
    args = ["quantize", str(model), *gptq_args(tmp_path), *extra]
    out = tmp_path / "resumed"
    progress = tmp_path / "resumed.partial" / ".lowbit-progress"
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "OMP_NUM_THREADS": "1"}

    process = subprocess.Popen([sys.executable, "-m", "lowbit.cli", *args, "-o", str(out)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while len(list(progress.glob("layer-*.safetensors"))) < 2:
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    layers_done = json.loads((progress / "progress.json").read_text())["layers_done"]
    assert 1 <= layers_done < 6

    resumed = run(*args, "-o", out)
    uninterrupted = run(*args, "-o", tmp_path / "uninterrupted")

    assert resumed.exit_code == 0, resumed.output
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert f"resumed from layer {layers_done}" in one_line(resumed.stdout)
    assert "resuming" in resumed.stderr and f"from layer {layers_done} of 6" in one_line(resumed.stderr)
    assert "resumed" not in uninterrupted.stdout
    assert not (tmp_path / "resumed.partial").exists()
    assert_same_files(out, tmp_path / "uninterrupted")


def interrupt_after_layers(monkeypatch, layers: int) -> None:
    """Make the next run stop like a Ctrl-C once `layers` decoder layers are saved (a layer is saved with its
    state, progress.save_layer_state: in the calibrated loop on the CPU in a thread, whose error the loop raises)."""
    from lowbit.quantize import progress

    save_state = progress.save_layer_state

    def save_then_stop(progress_dir, index, *args):
        save_state(progress_dir, index, *args)
        if index + 1 >= layers:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress, "save_layer_state", save_then_stop)


@pytest.fixture
def model(tmp_path) -> Path:
    return save_tiny_model(tmp_path / "model", layers=3, hidden=64)


def test_interrupted_run_keeps_its_progress_and_says_how_to_resume(model, tmp_path, monkeypatch):
    interrupt_after_layers(monkeypatch, 2)

    result = run("quantize", model, *RTN, "-o", tmp_path / "out")

    assert result.exit_code == 130
    assert "re-run the same command to resume" in result.stderr
    progress = json.loads((tmp_path / "out.partial" / ".lowbit-progress" / "progress.json").read_text())
    assert progress["layers_done"] == 2
    assert not (tmp_path / "out").exists()


def test_run_killed_while_writing_shards_resumes_to_the_same_bytes(model, tmp_path, monkeypatch):
    write_shard = writer._write_shard

    def write_half_then_stop(path, tensors):
        write_shard(path, tensors[: len(tensors) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_write_shard", write_half_then_stop)
    assert run("quantize", model, *RTN, "-o", tmp_path / "out").exit_code == 130
    assert list((tmp_path / "out.partial").glob("model-*.safetensors"))  # a shard that looks complete, but is not
    (tmp_path / "out.partial" / "config.json.tmp").write_text("{")  # what a kill inside write_json leaves
    monkeypatch.setattr(writer, "_write_shard", write_shard)

    resumed = run("quantize", model, *RTN, "-o", tmp_path / "out")
    uninterrupted = run("quantize", model, *RTN, "-o", tmp_path / "uninterrupted")

    assert resumed.exit_code == 0 and uninterrupted.exit_code == 0, resumed.output + uninterrupted.output
    assert "resumed from layer 3" in one_line(resumed.stdout)
    assert_same_files(tmp_path / "out", tmp_path / "uninterrupted")


@pytest.mark.parametrize("change", [["--bits", "8"], ["--group-size", "64"], ["--asym"]])
def test_changed_settings_refuse_stale_progress_and_force_starts_over(change, model, tmp_path, monkeypatch):
    interrupt_after_layers(monkeypatch, 1)
    assert run("quantize", model, *RTN, "-o", tmp_path / "out").exit_code == 130
    monkeypatch.undo()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    stale = folder_bytes(tmp_path / "out.partial" / ".lowbit-progress")

    refused = run("quantize", model, *RTN, *change, "-o", tmp_path / "out")

    assert refused.exit_code == 4, refused.output
    assert "holds progress of a run with other settings or inputs" in one_line(refused.stderr)
    assert "--force" in one_line(refused.stderr)
    assert folder_bytes(tmp_path / "out.partial" / ".lowbit-progress") == stale  # left as it was

    forced = run("quantize", model, *RTN, *change, "-o", tmp_path / "out", "--force")
    fresh = run("quantize", model, *RTN, *change, "-o", tmp_path / "fresh")

    assert forced.exit_code == 0 and fresh.exit_code == 0, forced.output + fresh.output
    assert "resumed" not in forced.stdout
    assert not (tmp_path / "out.partial").exists()
    assert_same_files(tmp_path / "out", tmp_path / "fresh")


def test_changed_source_weights_refuse_stale_progress(model, tmp_path, monkeypatch):
    interrupt_after_layers(monkeypatch, 1)
    assert run("quantize", model, *RTN, "-o", tmp_path / "out").exit_code == 130
    monkeypatch.undo()
    shard = sorted(model.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes())  # same bytes and size, but rewritten: the source may have changed
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))

    refused = run("quantize", model, *RTN, "-o", tmp_path / "out")

    assert refused.exit_code == 4, refused.output
    assert "other settings or inputs" in one_line(refused.stderr)


def test_a_layer_is_saved_while_the_next_one_starts_and_its_activations_do_not_move_under_it(model, tmp_path,
                                                                                             monkeypatch):
    """On the CPU a layer's state (its activations, then progress.json) is written in a thread of its own
    (progress.LayerSaver) while the next layer's first passes run; nothing writes the activations until
    it is done."""
    from lowbit.calibration.windows import CalibrationConfig
    from lowbit.quantize import progress as progress_module
    from lowbit.quantize import steps

    events, save_state, run_until = [], progress_module.save_layer_state, steps.run_layer_until

    def slow_save(progress_dir, index, progress, stats, acts, ranks, windows, fp_hidden):
        before, fp_before = acts.hidden.clone(), fp_hidden.clone()  # the unquantized model's too (fp_targets.py)
        events.append(("save starts", index))
        time.sleep(0.5)
        save_state(progress_dir, index, progress, stats, acts, ranks, windows, fp_hidden)
        events.append(("save ends", index, torch.equal(before, acts.hidden) and torch.equal(fp_before, fp_hidden)))

    def pass_until(*args, **kwargs):
        events.append(("pass",))
        return run_until(*args, **kwargs)

    monkeypatch.setattr(progress_module, "save_layer_state", slow_save)
    monkeypatch.setattr(steps, "run_layer_until", pass_until)
    driver.quantize_model(str(model), tmp_path / "q", driver.QuantizeSettings(group_size=32, fp_targets=True),
                          CalibrationConfig(source="pydoc", nsamples=2, seqlen=32))
    ends = [e for e in events if e[0] == "save ends"]
    assert [e[1] for e in ends] == [0, 1, 2] and all(e[2] for e in ends)  # every save, on unchanged activations
    first_save = events.index(("save starts", 0))
    assert ("pass",) in events[first_save : events.index(ends[0])]  # layer 1's first pass ran during layer 0's save
    assert (tmp_path / "q" / "config.json").exists() and not (tmp_path / "q.partial").exists()
