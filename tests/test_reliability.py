"""Bad input gets one clear line, a distinct exit code, and leaves nothing behind; and the safety rules.

Most cases run `lowbit quantize` in-process through Typer's CliRunner on a
2-layer random model (RTN, which needs no calibration, unless the case is
about GPTQ). Each case breaks a fresh copy of the model in one way.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.quantize.checkpoint import read_header
from lowbit.quantize.sweep import all_finite
from tests.conftest import save_tiny_model

RTN = ["--method", "rtn", "--group-size", "32"]
FAKE_TOKEN = "hf_LowbitFakeTokenForLeakTests0123456789"
CODE_MARKER = "remote-code-ran"  # the custom code of the remote-code case would create this file


def run(*args, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line(text: str) -> str:
    """The terminal wraps long lines; the message is what the words say."""
    return " ".join(text.split())


def error_message(stderr: str) -> str:
    """The message after the one "error:" (below any progress bars), unwrapped."""
    assert stderr.count("error:") == 1, stderr
    return one_line(stderr[stderr.index("error:") + len("error:"):])


def calibration_file(folder: Path, chars: int = 4000) -> Path:
    text = ("Quantization maps each weight to one of a few levels. " * 200)[:chars]
    file = folder / f"calibration-{chars}.txt"
    file.write_text(text)
    return file


def gptq_args(folder: Path) -> list:
    return ["--method", "gptq", "--nsamples", "4", "--seqlen", "64", "--group-size", "32",
            "--calibration", calibration_file(folder)]


def tensor_info(model: Path, name: str):
    for shard in model.glob("*.safetensors"):
        header = read_header(shard)
        if name in header:
            return header[name]
    raise KeyError(name)


def poke_float32(model: Path, name: str, value: float) -> None:
    """Overwrite the first element of a float32 tensor in its shard."""
    info = tensor_info(model, name)
    assert info.dtype == torch.float32
    with open(info.file, "r+b") as f:
        f.seek(info.start)
        f.write(struct.pack("<f", value))


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("template") / "tiny", layers=2, hidden=64)


@pytest.fixture
def model(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "model"))


# ---------------------------------------------------------------- the cases: each breaks the model or the command

def missing_path(model: Path, tmp: Path) -> list:
    return [tmp / "no-such-model", *RTN]


def missing_hub_repo(model: Path, tmp: Path) -> list:
    return ["lowbit-nobody/no-such-model", *RTN]  # HF_HUB_OFFLINE=1: not cached, not downloadable


def no_weights(model: Path, tmp: Path) -> list:
    for file in [*model.glob("*.safetensors"), model / "model.safetensors.index.json"]:
        file.unlink()
    return [model, *RTN]


def pickled_weights(model: Path, tmp: Path) -> list:
    from lowbit.quantize.checkpoint import SafetensorsCheckpoint

    reader = SafetensorsCheckpoint(model)
    torch.save({name: reader.read(name) for name in reader.names()}, model / "pytorch_model.bin")
    no_weights(model, tmp)
    return [model, *RTN]


def truncated_shard(model: Path, tmp: Path) -> list:
    shard = tensor_info(model, "model.layers.1.mlp.down_proj.weight").file
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return [model, *RTN]


def corrupt_header(model: Path, tmp: Path) -> list:
    shard = sorted(model.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    return [model, *RTN]


def no_config(model: Path, tmp: Path) -> list:
    (model / "config.json").unlink()
    return [model, *RTN]


def config_not_json(model: Path, tmp: Path) -> list:
    (model / "config.json").write_text("{not json")
    return [model, *RTN]


def unsupported_architecture(model: Path, tmp: Path) -> list:
    edit_config(model, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return [model, *RTN]


def remote_code(model: Path, tmp: Path) -> list:
    """A config whose model type exists only in the repo's own Python files, which would leave a marker."""
    marker = tmp / CODE_MARKER
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    code += "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    (model / "configuration_evil.py").write_text(code)
    (model / "modeling_evil.py").write_text(code)
    edit_config(model, model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    return [model, *gptq_args(tmp)]


def nan_in_a_layer(model: Path, tmp: Path) -> list:
    poke_float32(model, "model.layers.1.mlp.down_proj.weight", float("nan"))
    return [model, *gptq_args(tmp)]  # found after layer 0 is done: the partial progress must go too


def inf_in_lm_head(model: Path, tmp: Path) -> list:
    poke_float32(model, "lm_head.weight", float("inf"))
    return [model, *RTN]  # found only while the output shards are written


def short_calibration(model: Path, tmp: Path) -> list:
    return [model, "--method", "gptq", "--nsamples", "4", "--seqlen", "64", "--group-size", "32",
            "--calibration", calibration_file(tmp, chars=40)]


def group_size_does_not_divide(model: Path, tmp: Path) -> list:
    return [model, "--method", "rtn", "--group-size", "48"]


def output_exists(model: Path, tmp: Path) -> list:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return [model, *RTN]


def index_escapes_folder(model: Path, tmp: Path) -> list:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    shutil.copyfile(model / shard, tmp / "x.safetensors")
    index["weight_map"]["lm_head.weight"] = "../x.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return [model, *RTN]


CASES: list[tuple[Callable, int, str]] = [
    (missing_path, 2, "model not found"),
    (missing_hub_repo, 2, "model lowbit-nobody/no-such-model cannot be had: HF_HUB_OFFLINE is set"),
    (no_weights, 2, "no safetensors weights"),
    (pickled_weights, 3, "only pickled .bin weights, and unpickling can run code"),
    (truncated_shard, 3, "corrupt safetensors file"),
    (corrupt_header, 3, "corrupt safetensors file"),
    (no_config, 2, "no config.json"),
    (config_not_json, 3, "config.json in"),
    (unsupported_architecture, 2, "unsupported architecture GPT2LMHeadModel"),
    (remote_code, 2, "lowbit runs a repo's code only with --trust-remote-code"),
    (nan_in_a_layer, 3, "weight model.layers.1.mlp.down_proj.weight contains NaN or Inf"),
    (inf_in_lm_head, 3, "weight lm_head.weight contains NaN or Inf"),
    (short_calibration, 2, "fewer than one window of 64"),
    (group_size_does_not_divide, 2, "group size 48 does not divide in_features 64"),
    (output_exists, 4, "exists (use --force to replace it)"),
    (index_escapes_folder, 3, "index names a shard outside the model folder: ../x.safetensors"),
]


@pytest.mark.parametrize("make_case, exit_code, message", CASES, ids=[case[0].__name__ for case in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing(make_case, exit_code, message, model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = make_case(model, tmp_path)
    out = tmp_path / "out"
    existed = sorted(p.name for p in out.iterdir()) if out.exists() else None

    result = run("quantize", *args, "--output", out)

    assert result.exit_code == exit_code, result.output
    assert message in error_message(result.stderr)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.with_name("out.partial").exists()
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == existed
    assert not (tmp_path / CODE_MARKER).exists()


def test_pickled_weights_load_with_allow_pickle(model, tmp_path):
    pickled_weights(model, tmp_path)
    reference = tmp_path / "reference"
    save_tiny_model(reference, layers=2, hidden=64)  # the same seed: the same weights, as safetensors

    from_pickle = run("quantize", model, *RTN, "--allow-pickle", "-o", tmp_path / "a")
    from_safetensors = run("quantize", reference, *RTN, "-o", tmp_path / "b")

    assert from_pickle.exit_code == 0, from_pickle.output
    assert from_safetensors.exit_code == 0, from_safetensors.output
    for shard in (tmp_path / "b").glob("*.safetensors"):
        assert (tmp_path / "a" / shard.name).read_bytes() == shard.read_bytes()


def test_pickle_with_code_is_refused_even_with_allow_pickle(model, tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (tmp_path / CODE_MARKER,))

    no_weights(model, tmp_path)
    torch.save({"model.embed_tokens.weight": RunsCode()}, model / "pytorch_model.bin")  # unpickling it would run touch

    result = run("quantize", model, *RTN, "--allow-pickle", "-o", tmp_path / "out")

    assert result.exit_code == 3, result.output
    assert "cannot load pickled weights pytorch_model.bin safely" in error_message(result.stderr)
    assert not (tmp_path / CODE_MARKER).exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_disk_full(*args, **kwargs):
    from safetensors import SafetensorError

    # what safetensors' save_file raises on a full disk (seen on a full tmpfs)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("target, fail", [("lowbit.quantize.writer._write_shard", fail_with_enospc),
                                          ("lowbit.quantize.progress.save_file", safetensors_disk_full)],
                         ids=["writing-shards", "saving-progress"])
def test_disk_full_cleans_up_and_says_how_much_is_needed(target, fail, model, tmp_path, monkeypatch):
    monkeypatch.setattr(target, fail)
    out = tmp_path / "out"

    result = run("quantize", model, *RTN, "-o", out)

    assert result.exit_code == 5, result.output
    assert "disk full while writing" in error_message(result.stderr)
    assert re.search(r"about [0-9.]+ [MG]B needed, [0-9.]+ [MG]B free", error_message(result.stderr))
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_remote_code_config_is_refused_for_every_method(model, tmp_path):
    remote_code(model, tmp_path)
    for method_args in (RTN, ["--method", "nf4"], gptq_args(tmp_path)):
        result = run("quantize", model, *method_args, "-o", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert "--trust-remote-code" in error_message(result.stderr)
    assert not (tmp_path / CODE_MARKER).exists()


def test_output_stays_inside_its_folder(model, tmp_path):
    (model / "notes").mkdir()
    (model / "notes" / "tokenizer.json").write_text("{}")  # not in the model folder itself: not copied
    before = {p for p in tmp_path.rglob("*")}

    result = run("quantize", model, *RTN, "-o", tmp_path / "out")

    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    written = {p for p in tmp_path.rglob("*")} - before
    assert written == {out, *out.iterdir()}
    assert all(p.is_file() for p in out.iterdir())  # flat: no sub folders
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    assert {p.name for p in out.iterdir()} == set(manifest["files"]) | {"lowbit_manifest.json"}


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(model, tmp_path):
    from lowbit.quantize.writer import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # what a running `lowbit quantize -o out` holds
        result = run("quantize", model, *RTN, "-o", out, "--force")
        assert result.exit_code == 4, result.output
        assert "another lowbit run" in error_message(result.stderr)
        assert not out.exists() and not out.with_name("out.partial").exists()

    result = run("quantize", model, *RTN, "-o", out)
    assert result.exit_code == 0, result.output
    assert not out.with_name("out.lock").exists()  # gone with the run


def test_quiet_json_output_is_only_json_on_stdout(model, tmp_path):
    result = run("-q", "quantize", model, *RTN, "-o", tmp_path / "out", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["manifest"]["method"] == "rtn"
    assert Path(report["output"]) == tmp_path / "out"
    assert "quantize" not in result.stderr  # no progress bars with --quiet


def test_progress_and_logs_go_to_stderr(model, tmp_path):
    result = run("-v", "quantize", model, *RTN, "-o", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert "━" in result.stderr and "━" not in result.stdout  # progress bars on stderr
    assert one_line(result.stdout).startswith(f"wrote {tmp_path / 'out'}: rtn")  # the result on stdout


def test_hub_token_never_appears_in_output_or_files(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    results = [
        run("-v", "quantize", model, *RTN, "-o", out, "--json"),
        run("-v", "inspect", out, "--verify"),
        run("-v", "inspect", out, "--json"),
        run("-v", "quantize", tmp_path / FAKE_TOKEN, *RTN, "-o", tmp_path / "other"),  # fails, naming the path
        run("-v", "inspect", tmp_path / FAKE_TOKEN),
    ]

    assert [r.exit_code for r in results] == [0, 0, 0, 2, 2]
    assert "hf_***" in results[3].stderr  # the failing command's message was about the token, redacted
    for result in results:
        assert FAKE_TOKEN not in result.stdout and FAKE_TOKEN not in result.stderr
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert FAKE_TOKEN.encode() not in file.read_bytes(), file


def test_hub_snapshot_with_symlinked_shards_is_read(model, tmp_path):
    """A Hub snapshot's files are symlinks into a blob store: the index check judges names, not targets."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for file in sorted(model.iterdir()):
        blob = blobs / f"blob-{file.name}"
        file.rename(blob)
        file.symlink_to(blob)

    result = run("quantize", model, *RTN, "-o", tmp_path / "out")

    assert result.exit_code == 0, result.output
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_next_layer_is_read_ahead_by_the_kernel_while_one_is_solved(model, tmp_path, monkeypatch, method):
    import os

    from lowbit.calibration.windows import CalibrationConfig
    from lowbit.quantize.checkpoint import SafetensorsCheckpoint
    from lowbit.quantize.driver import quantize_model
    from lowbit.quantize.settings import QuantizeSettings

    tensors = SafetensorsCheckpoint(model).tensors
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, length, advice: advised.append((start, length, advice)))
    calibration = CalibrationConfig(source="pydoc", nsamples=2, seqlen=16) if method == "gptq" else None
    quantize_model(str(model), tmp_path / "q", QuantizeSettings(method=method, bits=4, group_size=32), calibration)
    # the second of two layers, every byte of each of its tensors, once, as the first was read
    expected = [(info.start, info.nbytes, os.POSIX_FADV_WILLNEED) for name, info in tensors.items()
                if name.startswith("model.layers.1.")]
    assert expected and sorted(advised) == sorted(expected)


BAD_VALUES = [(dtype, bad) for dtype in (torch.float32, torch.bfloat16, torch.float16)
              for bad in (float("nan"), float("inf"), float("-inf"))] + [(torch.float8_e4m3fn, float("nan"))]  # no inf


@pytest.mark.parametrize(("dtype", "bad"), BAD_VALUES)
def test_one_bad_value_anywhere_is_found(dtype, bad):
    values = torch.randn(37, 53).to(dtype)
    assert all_finite(values) and all_finite(values[:0])
    for index in (0, 1000, values.numel() - 1):
        poked = values.clone()
        poked.view(-1)[index] = torch.tensor(bad).to(dtype)
        assert not all_finite(poked), (dtype, bad, index)
