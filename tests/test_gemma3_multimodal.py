"""Gemma 3 multimodal (how 4B, 12B and 27B ship): the language model quantized, the vision tower copied as it is."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import Gemma3ForConditionalGeneration

from lowbit.calibration.windows import CalibrationConfig
from lowbit.evals.evaluate import EvalOptions, final_hidden_states, perplexity
from lowbit.checkpoint_info import tensor_problems
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.checkpoint import SafetensorsCheckpoint, load_config_dict
from lowbit.quantize.driver import quantize_model
from lowbit.quantize.loader import DenseWeights, load_dequantized_model
from lowbit.quantize.arch import model_shape
from lowbit.quantize.settings import QuantizeSettings
from tests.conftest import save_tiny_gemma3_multimodal
from tests.test_gemma3 import reference_loss

SEQLEN = 32
CPU = EvalOptions(seqlen=SEQLEN, device="cpu", dtype="float32")
@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    return save_tiny_gemma3_multimodal(tmp_path_factory.mktemp("gemma3-mm") / "base")


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (2, SEQLEN), generator=torch.Generator().manual_seed(1))


def test_layout_and_plan_read_the_language_model(multimodal):
    config = load_config_dict(multimodal)
    arch = architecture_of(config, SafetensorsCheckpoint(multimodal).names())
    assert arch.text_prefix == "language_model.model."  # how transformers 5 saves it
    assert arch.num_layers == 3 and arch.multimodal
    shape = model_shape(config)
    assert (shape.layers, shape.hidden, shape.vocab, shape.tied) == (3, 64, 256, True)
    assert dict((l.name, l.out_features) for l in shape.linears)["self_attn.q_proj"] == 4 * 32  # head_dim 32


def test_text_only_evaluation_matches_transformers(multimodal, windows):
    model = Gemma3ForConditionalGeneration.from_pretrained(multimodal, dtype=torch.float32).eval()
    hidden = final_hidden_states(multimodal, windows, CPU)
    with torch.no_grad():
        expected = model.model(input_ids=windows).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    head = DenseWeights(multimodal).lm_head_weight().float()
    assert math.log(perplexity(hidden, windows, head)["ppl"]) == pytest.approx(reference_loss(model, windows), rel=1e-5)


def vision_tensors(folder) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(folder)
    return {n: checkpoint.read(n) for n in checkpoint.names() if not n.startswith("language_model.")}


@pytest.mark.parametrize("settings", [QuantizeSettings(method="gptq", bits=4, group_size=32),
                                      QuantizeSettings(method="nf4")], ids=["gptq", "nf4"])
def test_language_model_quantized_vision_tower_copied(multimodal, windows, tmp_path, settings):
    calibration = CalibrationConfig(source="pydoc", nsamples=4, seqlen=SEQLEN)  # text only
    result = quantize_model(str(multimodal), tmp_path / "q", settings, calibration)
    layers = result.manifest["layers"]  # per quantized Linear
    assert len(layers) == 3 * 7 and all(n.startswith("language_model.model.layers.") for n in layers)
    names = SafetensorsCheckpoint(tmp_path / "q").names()
    quantized = [n for n in names if n.endswith((".qweight", ".absmax"))]
    assert len(quantized) == 3 * 7 and all(n.startswith("language_model.model.layers.") for n in quantized)
    base_vision, quant_vision = vision_tensors(multimodal), vision_tensors(tmp_path / "q")
    assert base_vision.keys() == quant_vision.keys() and any(n.startswith("vision_tower.") for n in base_vision)
    assert all(torch.equal(base_vision[n], quant_vision[n]) for n in base_vision)
    assert tensor_problems(tmp_path / "q") == []

    base = Gemma3ForConditionalGeneration.from_pretrained(multimodal, dtype=torch.float32).eval()
    ours = load_dequantized_model(tmp_path / "q")
    base_loss, quant_loss = reference_loss(base, windows), reference_loss(ours, windows)
    assert quant_loss != base_loss and abs(quant_loss - base_loss) < 0.1 * base_loss
    hidden = final_hidden_states(tmp_path / "q", windows, CPU)
    head = DenseWeights(tmp_path / "q").lm_head_weight().float()
    assert math.log(perplexity(hidden, windows, head)["ppl"]) == pytest.approx(quant_loss, rel=1e-4)


def test_transformers_loads_multimodal_nf4_with_no_missing_or_unexpected_keys(multimodal, windows, tmp_path, caplog):
    quantize_model(str(multimodal), tmp_path / "nf4", QuantizeSettings(method="nf4"))
    with caplog.at_level(logging.WARNING):
        theirs, info = Gemma3ForConditionalGeneration.from_pretrained(
            tmp_path / "nf4", device_map="cpu", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    messages = " ".join(r.getMessage().lower() for r in caplog.records)
    assert "missing" not in messages and "unexpected" not in messages
    four_bit = [n for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 3 * 7 and all(n.startswith("model.language_model.layers.") for n in four_bit)
    dense_vision = [m for n, m in theirs.named_modules() if n.startswith("model.vision_tower") and type(m) is torch.nn.Linear]
    assert dense_vision  # the vision tower's Linears stay dense
    ours = load_dequantized_model(tmp_path / "nf4")
    with torch.no_grad():
        theirs_logits, ours_logits = theirs(input_ids=windows).logits.float(), ours(input_ids=windows).logits
    assert (theirs_logits - ours_logits).abs().max() < 0.05 * ours_logits.abs().max()


# google/gemma-3-27b-it's config.json, the fields the plan reads (written here: no Hub in tests)
GEMMA3_27B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "torch_dtype": "bfloat16",
    "text_config": {"model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504,
                    "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                    "vocab_size": 262208, "sliding_window": 1024, "query_pre_attn_scalar": 168,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14},
}


def test_plan_of_gemma3_27b_reads_its_text_config(tmp_path):
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app

    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_27B))
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--gpu", "24GiB", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["layers"] == 62 and data["model"]["hidden"] == 5376 and data["model"]["vocab"] == 262208
    hidden, inter, q, kv = 5376, 21504, 32 * 128, 16 * 128  # head_dim 128: q is 4096 wide, not 5376
    linears = 2 * q * hidden + 2 * kv * hidden + 3 * inter * hidden
    norms = 4 * hidden + 2 * 128
    assert data["model"]["parameters"] == 62 * (linears + norms) + 262208 * hidden + hidden  # tied: one embedding
    assert data["fits"] and data["quantize"]["gpu_phase"] == "solve mlp.down_proj"  # K = 21504
