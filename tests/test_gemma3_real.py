"""The real Gemma-3-270M (tied 262k-vocabulary head, five sliding-window layers to one full layer).

Kept cheap for a 2-core CPU: a few short windows, a few calibration windows.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowbit.calibration.windows import CalibrationConfig
from lowbit.evals.datasets import eval_windows, load_eval_text
from lowbit.evals.evaluate import EvalOptions, evaluate
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.checkpoint import load_config_dict
from lowbit.quantize.driver import quantize_model
from lowbit.quantize.loader import load_dequantized_model
from lowbit.quantize.settings import QuantizeSettings
from tests.test_gemma3 import reference_loss
from tests.test_quantize_real import split_wikitext

pytestmark = pytest.mark.slow

EVAL_SEQLEN = 600  # past the 512-token sliding window, so the sliding layers' mask matters


@pytest.fixture(scope="module")
def texts(shared_data, tmp_path_factory):
    return split_wikitext(shared_data, tmp_path_factory.mktemp("wikitext"))


def test_lowbit_eval_perplexity_equals_transformers_loss(gemma3_dir, texts):
    _, eval_text = texts
    options = EvalOptions(seqlen=EVAL_SEQLEN, max_windows=2, device="cpu", dtype="float32", chunk_tokens=256)
    report = evaluate(gemma3_dir, None, str(eval_text), options)
    windows = eval_windows(load_eval_text(str(eval_text))[0], AutoTokenizer.from_pretrained(gemma3_dir), EVAL_SEQLEN, 2)
    assert report["windows"] == 2 and report["seqlen"] == EVAL_SEQLEN
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    assert model.config.sliding_window < EVAL_SEQLEN
    expected = math.exp(reference_loss(model, windows))
    print({"lowbit": report["ppl"], "transformers": expected})
    assert report["ppl"] == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def eval_ids(gemma3_dir, texts):
    _, eval_text = texts
    return eval_windows(load_eval_text(str(eval_text))[0], AutoTokenizer.from_pretrained(gemma3_dir), 256, 1)


@pytest.fixture(scope="module")
def base_loss(gemma3_dir, eval_ids):
    return reference_loss(AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval(), eval_ids)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_checkpoint_loads_back_through_lowbits_loader(gemma3_dir, texts, eval_ids, base_loss, tmp_path, bits):
    calibration_text, _ = texts
    calibration = CalibrationConfig(source=str(calibration_text), nsamples=4, seqlen=128)
    result = quantize_model(str(gemma3_dir), tmp_path / "q", QuantizeSettings(method="gptq", bits=bits, group_size=128),
                            calibration)
    arch = architecture_of(load_config_dict(gemma3_dir))
    assert len(result.manifest["layers"]) == arch.num_layers * 7  # every Linear of every layer
    assert bits < result.manifest["bits_per_weight"] < bits + 0.5
    model = load_dequantized_model(tmp_path / "q")
    loss = reference_loss(model, eval_ids)
    print({"bits": bits, "base": base_loss, "gptq": loss})
    # quantized, and still a language model (a broken unpacking gives ~ln(262144) = 12.5). Measured with
    # only 4 x 128 calibration tokens: base 3.956, 4 bits 4.398 (+11 %), 3 bits 7.260 (+84 %)
    assert base_loss < loss < base_loss * (1.25 if bits == 4 else 2.0)


def test_nf4_checkpoint_loads_in_transformers_with_no_key_warnings(gemma3_dir, eval_ids, base_loss, tmp_path, caplog):
    quantize_model(str(gemma3_dir), tmp_path / "nf4", QuantizeSettings(method="nf4"))
    with caplog.at_level(logging.WARNING):
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu", dtype=torch.float32,
                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    messages = " ".join(r.getMessage().lower() for r in caplog.records)
    assert "missing" not in messages and "unexpected" not in messages
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 18 * 7
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the head is still the embedding
    loss = reference_loss(model, eval_ids)
    print({"base": base_loss, "nf4": loss})
    assert base_loss < loss < 1.1 * base_loss
