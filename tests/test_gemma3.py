"""Gemma 3 through the layer-by-layer engine: sliding-window and full layers, each with its own arguments."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.calibration.windows import CalibrationConfig
from lowbit.errors import UsageError
from lowbit.evals.evaluate import EvalOptions, final_hidden_states, perplexity
from lowbit.quantize.driver import quantize_model
from lowbit.quantize.loader import DenseWeights, load_dequantized_model
from lowbit.quantize.settings import QuantizeSettings
from lowbit.quantize.stream import build_skeleton, embed_windows, load_config, without_plain_causal_mask
from lowbit.checkpoint_info import tensor_problems
from tests.conftest import save_tiny_model

SEQLEN = 32  # four times the tiny model's sliding window of 8
HIDDEN = 96
CPU = EvalOptions(seqlen=SEQLEN, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    # bfloat16 on disk, as Gemma ships, and sqrt(96) is no bfloat16 number: the embedding scale must be
    # computed in float32 as transformers does, not in the skeleton's bfloat16
    return save_tiny_model(tmp_path_factory.mktemp("gemma") / "gemma3", "gemma3", layers=3, hidden=HIDDEN,
                           dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (3, SEQLEN), generator=torch.Generator().manual_seed(1))


def reference_loss(model, windows) -> float:
    with torch.no_grad():
        return float(torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean())


def test_layer_by_layer_matches_transformers_past_the_sliding_window(gemma, windows, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    assert model.config.sliding_window < SEQLEN and "sliding_attention" in model.config.layer_types
    hidden = final_hidden_states(gemma, windows, CPU)
    with torch.no_grad():
        expected = model.model(input_ids=windows).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    head = DenseWeights(gemma).lm_head_weight().float()  # tied: the embedding, unscaled
    assert perplexity(hidden, windows, head, chunk_tokens=7)["ppl"] == pytest.approx(
        math.exp(reference_loss(model, windows)), rel=1e-5)

    # the test can tell: with every layer on full attention (or one rotary base) the result moves
    for change in ({"layer_types": ["full_attention"] * 3},
                   {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 10.0}
                                        for t in ("sliding_attention", "full_attention")}}):
        config = load_config(gemma)
        for key, value in change.items():
            setattr(config, key, value)
        other = AutoModelForCausalLM.from_pretrained(gemma, config=config, dtype=torch.float32).eval()
        with torch.no_grad():
            moved = other.model(input_ids=windows).last_hidden_state
        assert (moved - expected).abs().max() > 1e-2


def test_each_layer_gets_the_mask_and_rotary_embedding_of_its_type(gemma, windows):
    skeleton = build_skeleton(load_config(gemma))
    acts = embed_windows(skeleton, DenseWeights(gemma).read("model.embed_tokens.weight"), windows,
                         torch.device("cpu"), torch.float32)
    sliding, _, full = acts.kwargs_by_layer
    assert len(acts.kwargs_by_layer) == 3
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # rotary bases
    mask = sliding["attention_mask"]
    assert mask is not None and not mask[0, 0, SEQLEN - 1, 0]  # the last position cannot see the first
    assert full["attention_mask"] is None or bool(full["attention_mask"][0, 0, SEQLEN - 1, 0])
    # embeddings scaled by sqrt(hidden), as Gemma3TextScaledWordEmbedding does
    embed = DenseWeights(gemma).read("model.embed_tokens.weight").float()
    torch.testing.assert_close(acts.hidden[0], embed[windows[0]] * HIDDEN ** 0.5)


def test_windows_are_embedded_from_the_rows_they_use_alone(gemma):
    ids = torch.tensor([[5, 7, 5, 200] * (SEQLEN // 4)])  # three distinct tokens
    skeleton = build_skeleton(load_config(gemma))
    table = skeleton.model.embed_tokens.weight
    embed = DenseWeights(gemma).read("model.embed_tokens.weight")
    acts = embed_windows(skeleton, embed, ids, torch.device("cpu"), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(acts.hidden, model.model.embed_tokens(ids))  # scaled, as the whole table gives
    assert skeleton.model.embed_tokens.weight is table and table.is_meta  # the skeleton as it was
    with pytest.raises(UsageError, match=f"token id {embed.shape[0]} is outside"):
        embed_windows(skeleton, embed, torch.full((1, SEQLEN), embed.shape[0]), torch.device("cpu"), torch.float32)


def test_a_mask_that_is_plain_causal_is_dropped_and_the_outputs_stay_exact(gemma):
    # windows no longer than the sliding window (8): the sliding layers' masks are plain causal
    short = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    skeleton = build_skeleton(load_config(gemma))
    acts = embed_windows(skeleton, DenseWeights(gemma).read("model.embed_tokens.weight"), short,
                         torch.device("cpu"), torch.float32)
    assert all(kwargs.get("attention_mask") is None for kwargs in acts.kwargs_by_layer)
    model = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        expected = model.model(input_ids=short).last_hidden_state
    hidden = final_hidden_states(gemma, short, EvalOptions(seqlen=8, device="cpu", dtype="float32"))
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_only_a_plain_causal_mask_on_a_causal_layer_is_dropped(gemma):
    layer = build_skeleton(load_config(gemma)).model.layers[0]
    causal = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    sliding = causal & ~torch.ones(8, 8, dtype=torch.bool).tril(-4)[None, None]
    assert without_plain_causal_mask({"attention_mask": causal, "x": 1}, layer) == {"attention_mask": None, "x": 1}
    assert without_plain_causal_mask({"attention_mask": sliding}, layer)["attention_mask"] is sliding
    assert without_plain_causal_mask({"attention_mask": causal.repeat(2, 1, 1, 1)}, layer)["attention_mask"] is not None
    layer.self_attn.is_causal = False  # bidirectional attention: a causal mask is what makes it causal
    assert without_plain_causal_mask({"attention_mask": causal}, layer)["attention_mask"] is causal


def test_layer_run_on_another_layers_arguments_is_refused(gemma, windows):
    from lowbit.quantize.stream import run_layer

    skeleton = build_skeleton(load_config(gemma))
    acts = embed_windows(skeleton, DenseWeights(gemma).read("model.embed_tokens.weight"), windows[:1],
                         torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="layer 2 run on activations entering layer 0"):
        run_layer(skeleton.model.layers[2], acts, torch.device("cpu"))


@pytest.mark.parametrize("settings,calibrated", [
    (QuantizeSettings(method="gptq", bits=4, group_size=32), True),
    (QuantizeSettings(method="gptq", bits=3, group_size=32), True),
    (QuantizeSettings(method="rtn", bits=4, group_size=32), False),
    (QuantizeSettings(method="nf4"), False),
    (QuantizeSettings(method="nf4"), True),
], ids=["gptq4", "gptq3", "rtn4", "nf4", "nf4-calibrated"])
def test_quantized_gemma3_loads_back_close_to_its_base(gemma, windows, tmp_path, settings, calibrated):
    calibration = CalibrationConfig(source="pydoc", nsamples=4, seqlen=SEQLEN) if calibrated else None
    quantize_model(str(gemma), tmp_path / "q", settings, calibration)
    ours = load_dequantized_model(tmp_path / "q")
    base = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    base_loss, quant_loss = reference_loss(base, windows), reference_loss(ours, windows)
    assert quant_loss != base_loss and abs(quant_loss - base_loss) < 0.1 * base_loss
    # the layer-by-layer evaluator reads the same checkpoint to the same loss
    hidden = final_hidden_states(tmp_path / "q", windows, CPU)
    head = DenseWeights(tmp_path / "q").lm_head_weight().float()
    assert math.log(perplexity(hidden, windows, head)["ppl"]) == pytest.approx(quant_loss, rel=1e-4)
    assert tensor_problems(tmp_path / "q") == []  # lowbit inspect --verify: every tensor the config implies


def test_transformers_loads_gemma3_nf4_with_no_key_warnings(gemma, tmp_path, caplog):
    quantize_model(str(gemma), tmp_path / "nf4", QuantizeSettings(method="nf4"))
    with caplog.at_level(logging.WARNING):
        theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu", dtype=torch.float32,
                                                            output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    messages = " ".join(r.getMessage().lower() for r in caplog.records)
    assert "missing" not in messages and "unexpected" not in messages
    assert sum(type(m).__name__ == "Linear4bit" for m in theirs.modules()) == 3 * 7


def test_run_resumed_at_the_full_attention_layer_gives_the_same_bytes(gemma, tmp_path, monkeypatch):
    """Layer 2 is the full-attention one: a resumed run must hand it its own mask and rotary base."""
    from tests.test_resume import assert_same_files, interrupt_after_layers

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    settings = QuantizeSettings(method="gptq", bits=4, group_size=32)
    calibration = CalibrationConfig(source="pydoc", nsamples=4, seqlen=SEQLEN)
    with monkeypatch.context() as patch:
        interrupt_after_layers(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(str(gemma), tmp_path / "resumed", settings, calibration)
    assert quantize_model(str(gemma), tmp_path / "resumed", settings, calibration).resumed_from_layer == 2
    quantize_model(str(gemma), tmp_path / "whole", settings, calibration)
    assert_same_files(tmp_path / "resumed", tmp_path / "whole")
