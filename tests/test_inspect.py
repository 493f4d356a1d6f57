"""`lowbit inspect`: what a checkpoint is, and --verify against its manifest and config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.checkpoint_info import verify
from lowbit.files import sha256_file
from tests.conftest import save_tiny_model

SHARD = "model-00001-of-00001.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj"

OUTPUTS = {  # name -> (architecture, quantize options)
    "gptq": ("llama", ["--method", "gptq", "--nsamples", "2", "--seqlen", "32", "--group-size", "32"]),
    "rtn3": ("llama", ["--method", "rtn", "--bits", "3", "--group-size", "-1"]),
    "nf4-skip": ("llama", ["--method", "nf4", "--skip", "down_proj"]),
    "fp4-qwen2": ("qwen2", ["--method", "fp4", "--no-double-quant"]),  # q/k/v have biases
    "rtn-phi3": ("phi3", ["--method", "rtn", "--group-size", "32"]),  # fused qkv and gate_up
}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    (root / "calibration.txt").write_text("A checkpoint is verified file by file and tensor by tensor. " * 40)
    folders = {}
    for name, (arch, options) in OUTPUTS.items():
        model = root / f"model-{arch}"
        if not model.exists():
            save_tiny_model(model, arch, layers=2, hidden=64)
        calibration = ["--calibration", root / "calibration.txt"] if "gptq" in options else []
        result = run("-q", "quantize", model, *options, *calibration, "-o", root / name)
        assert result.exit_code == 0, result.output
        assert ("vLLM loads GPTQ only" in one_line(result.output)) == (name == "rtn3")  # quantize's notes
        assert ("no longer loads bitsandbytes" in one_line(result.output)) == (name[:3] in ("nf4", "fp4"))
        folders[name] = root / name
    return folders


@pytest.fixture
def gptq_copy(outputs, tmp_path) -> Path:
    return Path(shutil.copytree(outputs["gptq"], tmp_path / "gptq"))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "lowbit_manifest.json").read_text())


def rehash(folder: Path, *names: str) -> None:
    """Record the current bytes of files in the manifest, so that only the tensor checks can object."""
    manifest = manifest_of(folder)
    for name in names:
        manifest["files"][name] = {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
    (folder / "lowbit_manifest.json").write_text(json.dumps(manifest))


def rewrite_shard(folder: Path, change) -> None:
    tensors = load_file(folder / SHARD)
    change(tensors)
    save_file(tensors, folder / SHARD, metadata={"format": "pt"})
    rehash(folder, SHARD)


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_summary_says_what_the_checkpoint_is(name, outputs):
    folder = outputs[name]
    manifest = manifest_of(folder)

    result = run("inspect", folder, "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert report["problems"] is None  # not asked to verify
    assert summary["method"] == manifest["method"] == name.split("-")[0].rstrip("3")
    assert summary["bits_per_weight"] == manifest["bits_per_weight"]
    assert summary["size_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    assert summary["source"] == manifest["source"]
    if manifest["method"] in ("gptq", "rtn"):
        settings = manifest["settings"]
        assert (summary["bits"], summary["group_size"]) == (settings["bits"], settings["group_size"])
        # vLLM takes 4-bit symmetric codes; rtn3 is 3-bit asymmetric (tests/test_vllm.py checks the rule on vLLM)
        assert (summary["vllm_refusal"] is None) == (name != "rtn3")
    else:
        assert (summary["bits"], summary["group_size"]) == (4, None)
        assert "no longer loads bitsandbytes" in summary["vllm_refusal"]


def test_text_summary_shows_settings_and_eval_results(gptq_copy):
    manifest = manifest_of(gptq_copy)
    manifest["eval"] = {"ppl_base": 10.0, "ppl_quantized": 10.25, "ppl_delta": 0.25, "kld": {"mean": 0.0123}}
    (gptq_copy / "lowbit_manifest.json").write_text(json.dumps(manifest))

    result = run("inspect", gptq_copy)

    assert result.exit_code == 0, result.output
    text = one_line(result.stdout)
    assert "method gptq" in text and "bits 4" in text and "group size 32" in text
    assert f"bits per weight {manifest['bits_per_weight']}" in text
    assert f"source {manifest['source']['model']}" in text
    assert "Perplexity delta +0.2500" in text and "KL divergence, mean 0.01230" in text


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_verify_passes_on_what_quantize_wrote(name, outputs):
    result = run("inspect", outputs[name], "--verify")

    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout
    assert verify(outputs[name]) == []


def flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / SHARD).read_bytes())
    data[-3] ^= 0x01
    (folder / SHARD).write_bytes(bytes(data))


def truncate_shard(folder: Path) -> None:
    data = (folder / SHARD).read_bytes()
    (folder / SHARD).write_bytes(data[:-8])


def delete_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def add_unlisted_shard(folder: Path) -> None:
    shutil.copyfile(folder / SHARD, folder / "model-00002-of-00002.safetensors")


def qweight_of_other_shape(folder: Path) -> None:
    rewrite_shard(folder, lambda t: t.update({f"{Q_PROJ}.qweight": t[f"{Q_PROJ}.qweight"][:-1].clone()}))


def scales_in_float32(folder: Path) -> None:
    rewrite_shard(folder, lambda t: t.update({f"{Q_PROJ}.scales": t[f"{Q_PROJ}.scales"].float()}))


def g_idx_dropped(folder: Path) -> None:
    rewrite_shard(folder, lambda t: t.pop(f"{Q_PROJ}.g_idx"))


def norm_in_float16(folder: Path) -> None:
    name = "model.layers.1.input_layernorm.weight"
    rewrite_shard(folder, lambda t: t.update({name: t[name].half()}))


def extra_tensor(folder: Path) -> None:
    rewrite_shard(folder, lambda t: t.update({"model.layers.0.backdoor": torch.zeros(4)}))


def config_says_8_bits(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    rehash(folder, "config.json")


TAMPERING = [
    (flip_a_byte, f"{SHARD}: sha256 differs from the manifest"),
    (truncate_shard, f"{SHARD}:"),
    (delete_tokenizer, "tokenizer.json: missing"),
    (add_unlisted_shard, "model-00002-of-00002.safetensors: not in the manifest"),
    (qweight_of_other_shape, f"{Q_PROJ}.qweight: int32 [7, 64], the config implies int32 [8, 64]"),
    (scales_in_float32, f"{Q_PROJ}.scales: float32 [2, 64], the config implies float16 [2, 64]"),
    (g_idx_dropped, f"{Q_PROJ}.g_idx: missing"),
    (norm_in_float16, "model.layers.1.input_layernorm.weight: float16 [64], the config implies float32 [64]"),
    (extra_tensor, "model.layers.0.backdoor: not a tensor this config has"),
    (config_says_8_bits, f"{Q_PROJ}.qweight: int32 [8, 64], the config implies int32 [16, 64]"),
]


@pytest.mark.parametrize("tamper, problem", TAMPERING, ids=[t[0].__name__ for t in TAMPERING])
def test_verify_names_every_mismatch_and_exits_7(tamper, problem, gptq_copy):
    tamper(gptq_copy)

    result = run("inspect", gptq_copy, "--verify", "--json")

    assert result.exit_code == 7, result.output
    problems = json.loads(result.stdout)["problems"]
    assert any(p.startswith(problem) for p in problems), problems
    assert "failed verification" in one_line(result.stderr)


def test_verify_checks_bitsandbytes_tensors(outputs, tmp_path):
    folder = Path(shutil.copytree(outputs["nf4-skip"], tmp_path / "nf4"))
    module = "model.layers.1.mlp.up_proj"
    rewrite_shard(folder, lambda t: t.pop(f"{module}.weight.nested_absmax"))

    problems = verify(folder)

    assert problems == [f"{module}.weight.nested_absmax: missing"]


def test_verify_without_a_manifest_fails(outputs, tmp_path):
    folder = Path(shutil.copytree(outputs["rtn3"], tmp_path / "rtn3"))
    (folder / "lowbit_manifest.json").unlink()

    result = run("inspect", folder, "--verify")

    assert result.exit_code == 7
    assert "no lowbit_manifest.json" in one_line(result.stderr)


@pytest.mark.parametrize("what", ["missing", "no-config"])
def test_inspect_of_something_else_is_a_usage_error(what, tmp_path):
    folder = tmp_path / "thing"
    if what == "no-config":
        folder.mkdir()

    result = run("inspect", folder)

    assert result.exit_code == 2
    assert ("not a checkpoint folder" if what == "missing" else "no config.json") in one_line(result.stderr)
