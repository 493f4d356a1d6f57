"""A `lowbit quantize --method nf4` checkpoint, as transformers and bitsandbytes load it, without lowbit."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lowbit.calibration.windows import CalibrationConfig
from lowbit.quantize.checkpoint import SafetensorsCheckpoint
from lowbit.quantize.driver import quantize_model
from lowbit.quantize.loader import load_dequantized_model
from lowbit.quantize.settings import QuantizeSettings
from tests.conftest import save_tiny_model


@pytest.mark.parametrize("calibrated", [False, True], ids=["plain", "calibrated"])
def test_transformers_loads_lowbit_nf4_with_no_key_warnings_and_same_logits(tmp_path, caplog, calibrated):
    base = save_tiny_model(tmp_path / "base", "llama", layers=2, dtype=torch.bfloat16)
    calibration = CalibrationConfig(source="pydoc", nsamples=4, seqlen=64) if calibrated else None
    quantize_model(str(base), tmp_path / "nf4", QuantizeSettings(method="nf4"), calibration)

    with caplog.at_level(logging.WARNING):
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu", dtype=torch.float32)
    messages = " ".join(r.getMessage().lower() for r in caplog.records)
    assert "missing" not in messages and "unexpected" not in messages and "not used" not in messages
    assert sum(type(m).__name__ == "Linear4bit" for m in theirs.modules()) == 2 * 7

    ours = load_dequantized_model(tmp_path / "nf4")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # transformers computes in the bnb compute dtype (bfloat16 here), lowbit's loader in float32
        theirs_logits, ours_logits = theirs(ids).logits.float(), ours(ids).logits
    assert (theirs_logits - ours_logits).abs().max() < 0.05 * ours_logits.abs().max()
    assert (theirs_logits.argmax(-1) == ours_logits.argmax(-1)).float().mean() > 0.9


def test_lowbit_nf4_tensors_equal_what_transformers_saves(tmp_path):
    """Names, dtypes and shapes of every tensor, against a checkpoint transformers itself writes."""
    base = save_tiny_model(tmp_path / "base", "llama", layers=2, dtype=torch.bfloat16, max_shard_size="10GB")
    reference = AutoModelForCausalLM.from_pretrained(
        base, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    reference.save_pretrained(tmp_path / "reference")
    theirs = load_file(tmp_path / "reference" / "model.safetensors")
    quantize_model(str(base), tmp_path / "ours", QuantizeSettings(method="nf4"))
    ours = SafetensorsCheckpoint(tmp_path / "ours")
    if "lm_head.weight" not in ours and "lm_head.weight" in theirs:  # a tied head is saved by transformers only
        theirs.pop("lm_head.weight")
    assert set(ours.names()) == set(theirs)
    for name, tensor in theirs.items():
        assert (ours.info(name).dtype, ours.info(name).shape) == (tensor.dtype, tuple(tensor.shape)), name
