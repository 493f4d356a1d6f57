"""`lowbit eval` and the dense reader on checkpoints lowbit did not write.

Each foreign checkpoint is made here the way its tool makes it: transformers' own bitsandbytes saves
(BitsAndBytesConfig on the CPU), and GPTQ folders in the layouts AutoGPTQ and GPTQModel write (settings
only in quantize_config.json, act-order with a permuted g_idx, asymmetric zeros, gptq_v2 zeros, no g_idx).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.quantize.loader import DenseWeights
from lowbit.quantize.pack import pack_rows
from tests.conftest import save_tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("foreign") / "tiny", "llama", layers=2)


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def eval_text(tmp_path: Path) -> Path:
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    return text


# ---- transformers' bitsandbytes saves ----

BNB_CONFIGS = {
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}


def transformers_bnb_save(source: Path, output: Path, kind: str):
    """What `from_pretrained(..., quantization_config=BitsAndBytesConfig(...)).save_pretrained()` writes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**BNB_CONFIGS[kind], bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu")
    model.save_pretrained(output)
    return model


def bnb_dense(module) -> torch.Tensor:
    """The weight bitsandbytes computes with, from the loaded module itself."""
    import bitsandbytes.functional as bnb

    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        return bnb.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * (weight.SCB.float() / 127).unsqueeze(1)


@pytest.mark.parametrize("kind", list(BNB_CONFIGS))
def test_transformers_bitsandbytes_saves_read_as_bitsandbytes_computes_them(tiny, tmp_path, kind):
    model = transformers_bnb_save(tiny, tmp_path / kind, kind)
    dense = DenseWeights(tmp_path / kind).read_prefix("model.layers.1.")
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
        module = model.get_submodule(f"model.layers.1.{name}")
        torch.testing.assert_close(dense[f"{name}.weight"], bnb_dense(module), rtol=0, atol=1e-6)
    assert dense["input_layernorm.weight"].dtype.is_floating_point


def eval_untouched(folder, tiny, tmp_path, monkeypatch, windows: int):
    """`lowbit eval FOLDER --base TINY` from tmp_path: it must succeed and leave FOLDER as it was.
    Returns the result and the report it wrote beside the folder."""
    before = folder_digest(folder)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", str(folder), "--base", str(tiny), "--dataset", str(eval_text(tmp_path)),
                                      "--seqlen", "64", "--max-windows", str(windows)])
    assert result.exit_code == 0, result.output
    assert folder_digest(folder) == before
    return result, json.loads((tmp_path / f"{folder.name}.lowbit-eval.json").read_text())


def test_eval_of_a_transformers_nf4_save_leaves_it_alone_and_says_where_the_report_went(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "nf4"
    transformers_bnb_save(tiny, folder, "nf4-double-quant")  # no tokenizer: the base model's serves
    result, report = eval_untouched(folder, tiny, tmp_path, monkeypatch, windows=3)
    assert report["windows"] == 3 and 1.0 <= report["ppl_ratio"] < 2.0 and report["kld"]["mean"] > 0
    assert "not a lowbit checkpoint" in result.output and "nf4.lowbit-eval.json" in result.output


def test_eval_of_a_foreign_folder_without_a_base_asks_for_one(tiny, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tiny)])
    assert result.exit_code == 2
    assert "pass --base MODEL" in result.output and "Traceback" not in result.output


def test_eval_of_an_unquantized_model_against_itself_scores_zero_divergence(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(tiny), "--base", str(tiny), "--dataset", str(eval_text(tmp_path)),
                                      "--seqlen", "64", "--max-windows", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["ppl_ratio"] == pytest.approx(1.0, abs=1e-6) and report["kld"]["mean"] < 1e-6
    assert not list(tiny.glob("*lowbit*"))


# ---- GPTQ from other tools ----


def gptq_tensors(weight: torch.Tensor, bits: int, group_size: int, act_order: bool, zero_low: int,
                 stored_offset: int, with_g_idx: bool, generator: torch.Generator):
    """Random codes, scales and zeros for a weight's shape, packed as GPTQ; and the dense weight they mean.

    zero_low: the smallest zero point drawn (v1 cannot store 0); stored_offset: what the format subtracts.
    """
    n_out, n_in = weight.shape
    groups = n_in // group_size
    codes = torch.randint(0, 2**bits, (n_in, n_out), generator=generator)
    zeros = torch.randint(zero_low, 2**bits, (groups, n_out), generator=generator)
    scales = (torch.rand(groups, n_out, generator=generator) * 0.02 + 0.001).to(torch.float16)
    order = torch.randperm(n_in, generator=generator) if act_order else torch.arange(n_in)
    g_idx = torch.empty(n_in, dtype=torch.int32)
    g_idx[order] = (torch.arange(n_in) // group_size).to(torch.int32)  # act-order: group by position in the order
    dense = (scales.float()[g_idx.long()] * (codes - zeros[g_idx.long()]).float()).T
    tensors = {
        "qweight": pack_rows(codes, bits),
        "qzeros": pack_rows((zeros - stored_offset).T, bits).T.contiguous(),
        "scales": scales,
    }
    if with_g_idx:
        tensors["g_idx"] = g_idx
    return tensors, dense


GPTQ_VARIANTS = {
    # name: (bits, act_order, format, where the settings are, g_idx saved)
    "autogptq-quantize-config-only-desc-act-asym": (4, True, "gptq", "quantize_config.json", True),
    "gptqmodel-v2-zeros": (4, False, "gptq_v2", "config.json", True),
    "3bit-no-g-idx": (3, False, "gptq", "config.json", False),
}


def foreign_gptq(source: Path, output: Path, variant: str, group_size: int = 32) -> dict[str, torch.Tensor]:
    """A GPTQ folder as another tool writes it; returns the dense weights it stands for."""
    bits, act_order, fmt, settings_file, with_g_idx = GPTQ_VARIANTS[variant]
    generator = torch.Generator().manual_seed(1)
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(file))
    tensors, expected = {}, {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if module.split(".")[-1] not in LINEARS:
            tensors[name] = tensor
            continue
        parts, expected[name] = gptq_tensors(tensor, bits, group_size, act_order, zero_low=0 if fmt == "gptq_v2" else 1,
                                             stored_offset=0 if fmt == "gptq_v2" else 1, with_g_idx=with_g_idx,
                                             generator=generator)
        tensors.update({f"{module}.{key}": value for key, value in parts.items()})
    output.mkdir()
    save_file(tensors, output / "model.safetensors", metadata={"format": "pt"})
    settings = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False,
                "checkpoint_format": fmt, "quant_method": "gptq"}
    config = json.loads((source / "config.json").read_text())
    if settings_file == "config.json":
        config["quantization_config"] = settings
    else:  # AutoGPTQ's older saves: config.json says nothing, quantize_config.json has the settings
        (output / "quantize_config.json").write_text(json.dumps({k: v for k, v in settings.items()
                                                                  if k != "quant_method"}))
    (output / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("variant", list(GPTQ_VARIANTS))
def test_gptq_of_other_tools_reads_as_its_codes_scales_and_zeros_say(tiny, tmp_path, variant):
    expected = foreign_gptq(tiny, tmp_path / variant, variant)
    weights = DenseWeights(tmp_path / variant)
    for name, dense in expected.items():
        torch.testing.assert_close(weights.read(name), dense, rtol=0, atol=0)


def test_eval_of_an_act_order_asym_gptq_folder_with_only_quantize_config(tiny, tmp_path, monkeypatch):
    variant = "autogptq-quantize-config-only-desc-act-asym"
    folder = tmp_path / "other-tool"
    foreign_gptq(tiny, folder, variant)
    shutil.copy(tiny / "tokenizer.json", folder)
    result, report = eval_untouched(folder, tiny, tmp_path, monkeypatch, windows=2)
    assert report["kld"]["mean"] > 0.01  # random codes: far from the base, and scored as such


def test_gptq_tensors_without_any_settings_are_refused(tiny, tmp_path):
    folder = tmp_path / "bare"
    foreign_gptq(tiny, folder, "gptqmodel-v2-zeros")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    from lowbit.errors import UsageError

    with pytest.raises(UsageError, match="GPTQ tensors but neither config.json nor quantize_config.json"):
        DenseWeights(folder)
