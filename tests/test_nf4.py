import json
import logging
import math

import bitsandbytes.functional as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lowbit.errors import CorruptInputError, UsageError
from lowbit.quantize.nf4 import (BUCKET_BINS, BnbConfig, CodeBuckets, bnb_quantization_config, dequantize_bnb,
                                 quantize_bnb)

ALL_CONFIGS = [
    BnbConfig(quant_type=quant_type, double_quant=double_quant)
    for quant_type in ("nf4", "fp4")
    for double_quant in (False, True)
]
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config_id(config: BnbConfig) -> str:
    return f"{config.quant_type}-{'dq' if config.double_quant else 'nodq'}"


def random_weight(n_rows: int = 64, n_cols: int = 256, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n_rows, n_cols, generator=generator) * 0.02).to(dtype)


def correlated_inputs(n_cols: int, n_samples: int, seed: int = 1) -> torch.Tensor:
    """X [K, n]: independent Gaussians mixed by a random matrix, so inputs are correlated."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_cols, n_cols, generator=generator) / math.sqrt(n_cols)
    return (mixing + 0.1 * torch.eye(n_cols)) @ torch.randn(n_cols, n_samples, generator=generator)


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[1] * X @ X.T


def bitsandbytes_reference(weight: torch.Tensor, config: BnbConfig) -> dict[str, torch.Tensor]:
    data, state = bnb.quantize_4bit(
        weight, blocksize=64, compress_statistics=config.double_quant, quant_type=config.quant_type
    )
    return {"weight": data, **{f"weight.{key}": value for key, value in state.as_dict(packed=True).items()}}


def unpack_high_nibble_first(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()


# --- plain ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_plain_is_byte_identical_to_bitsandbytes(config):
    weight = random_weight()
    tensors, _, stats = quantize_bnb(weight, config)
    reference = bitsandbytes_reference(weight, config)
    assert tensors.keys() == reference.keys()
    for key, value in reference.items():
        assert tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key], value), key
        assert tensors[key].device.type == "cpu" and tensors[key].is_contiguous(), key
    assert stats["calibrated"] is False


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_plain_keys_dtypes_shapes_follow_formats_md(config):
    n_rows, n_cols = 64, 256
    tensors, _, _ = quantize_bnb(random_weight(n_rows, n_cols), config)
    n_blocks = math.ceil(n_rows * n_cols / 64)
    expected = {
        "weight": (torch.uint8, ((n_rows * n_cols + 1) // 2, 1)),
        "weight.absmax": (torch.uint8 if config.double_quant else torch.float32, (n_blocks,)),
        "weight.quant_map": (torch.float32, (16,)),
    }
    if config.double_quant:
        expected["weight.nested_absmax"] = (torch.float32, (math.ceil(n_blocks / 256),))
        expected["weight.nested_quant_map"] = (torch.float32, (256,))
    state_key = f"weight.quant_state.bitsandbytes__{config.quant_type}"
    assert set(tensors) == set(expected) | {state_key}
    for key, (dtype, shape) in expected.items():
        assert (tensors[key].dtype, tuple(tensors[key].shape)) == (dtype, shape), key

    state = tensors[state_key]
    assert state.dtype == torch.uint8 and state.dim() == 1
    fields = json.loads(bytes(state.tolist()))
    assert fields["quant_type"] == config.quant_type
    assert fields["blocksize"] == 64
    assert fields["dtype"] == "bfloat16"
    assert fields["shape"] == [n_rows, n_cols]
    assert ("nested_offset" in fields) == config.double_quant


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_dequantize_bnb_matches_bitsandbytes(config):
    weight = random_weight()
    data, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=config.double_quant, quant_type=config.quant_type)
    expected = bnb.dequantize_4bit(data, state).float()
    tensors, dequantized, _ = quantize_bnb(weight, config)
    assert dequantized.dtype == torch.float32 and dequantized.shape == weight.shape
    assert torch.equal(dequantize_bnb(tensors, tuple(weight.shape)), expected)
    assert torch.equal(dequantized, expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_packed_layout_is_two_codes_a_byte_high_nibble_first(quant_type):
    weight = random_weight(8, 128, dtype=torch.float32)
    tensors, dequantized, _ = quantize_bnb(weight, BnbConfig(quant_type=quant_type, double_quant=False))
    codes = unpack_high_nibble_first(tensors["weight"])
    values = tensors["weight.quant_map"][codes].reshape(-1, 64) * tensors["weight.absmax"].reshape(-1, 1)
    assert torch.equal(values.reshape(weight.shape), dequantized)


def test_dequantize_bnb_rejects_wrong_shape_and_missing_keys():
    tensors, _, _ = quantize_bnb(random_weight(), BnbConfig())
    with pytest.raises(CorruptInputError):
        dequantize_bnb(tensors, (256, 64))
    incomplete = {key: value for key, value in tensors.items() if key != "weight.absmax"}
    with pytest.raises(CorruptInputError):
        dequantize_bnb(incomplete, (64, 256))


def test_config_rejects_unknown_quant_type_and_block_size():
    with pytest.raises(UsageError):
        BnbConfig(quant_type="int4")
    with pytest.raises(UsageError):
        BnbConfig(blocksize=48)


# --- calibrated ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_returned_dequantized_is_what_a_loader_computes(config):
    weight = random_weight()
    hessian = hessian_of(correlated_inputs(256, 512))
    for maybe_hessian in (None, hessian):
        tensors, dequantized, _ = quantize_bnb(weight, config, maybe_hessian)
        assert torch.equal(dequantized, dequantize_bnb(tensors, (64, 256)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_buckets_table_finds_what_bucketize_finds(quant_type):
    buckets = CodeBuckets.of(bnb.get_4bit_type(quant_type, device="cpu"))
    assert (buckets.below is not None) == (quant_type == "nf4")  # FP4 has a bound at a bin's edge (0)
    bounds = buckets.bounds
    near = torch.cat([bounds + d for d in (0.0, 1e-7, -1e-7, 1e-6, -1e-6)])
    edges = torch.linspace(-1, 1, BUCKET_BINS + 1)
    x = torch.cat([torch.rand(200_000) * 2 - 1, near, edges, torch.nextafter(edges, edges + 1),
                   torch.nextafter(edges, edges - 1)]).clamp(-1, 1)
    x = torch.cat([x, torch.tensor([float("nan"), -0.0])])
    assert torch.equal(buckets.index(x), torch.bucketize(x, bounds, out_int32=True))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_calibrated_with_identity_hessian_equals_plain_without_double_quant(quant_type, act_order):
    config = BnbConfig(quant_type=quant_type, double_quant=False, act_order=act_order)
    weight = random_weight()
    plain, _, _ = quantize_bnb(weight, config)
    calibrated, _, stats = quantize_bnb(weight, config, torch.eye(256))
    assert stats["calibrated"] is True
    for key in plain:
        assert torch.equal(calibrated[key], plain[key]), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_calibrated_with_identity_hessian_rounds_to_nearest_effective_value_with_double_quant(quant_type):
    # bitsandbytes picks codes with the exact absmax, but a loader multiplies by the
    # double-quantized absmax. Calibrated rounds under the latter, so with H = I a few
    # codes may differ from plain, and then only in calibrated's favour, element by element.
    config = BnbConfig(quant_type=quant_type, double_quant=True)
    weight = random_weight(dtype=torch.float32)
    plain, plain_values, _ = quantize_bnb(weight, config)
    calibrated, calibrated_values, _ = quantize_bnb(weight, config, torch.eye(256))
    for key in plain:
        if key != "weight":
            assert torch.equal(calibrated[key], plain[key]), key
    plain_error = (weight - plain_values).abs()
    calibrated_error = (weight - calibrated_values).abs()
    assert (calibrated_error <= plain_error + 1e-6 * weight.abs().max()).all()
    same_codes = unpack_high_nibble_first(calibrated["weight"]) == unpack_high_nibble_first(plain["weight"])
    assert same_codes.float().mean() > 0.95


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_calibrated_has_lower_output_error_than_plain(config):
    weight = random_weight()
    X = correlated_inputs(256, 1024)
    _, plain_values, _ = quantize_bnb(weight, config)
    _, calibrated_values, stats = quantize_bnb(weight, config, hessian_of(X))
    plain_error = ((weight.float() - plain_values) @ X).norm()
    calibrated_error = ((weight.float() - calibrated_values) @ X).norm()
    assert calibrated_error < 0.9 * plain_error
    assert stats["calibrated"] is True and stats["damp"] == config.damp and stats["loss"] > 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_act_order_sweeps_the_active_inputs_first_and_writes_the_same_form(quant_type):
    """Inputs whose activity differs by orders of magnitude, most active last in column order: sweeping them
    first (act-order) leaves their error to be made up by the rest, not the other way round. The scales are
    the same either way, only codes differ, and a loader reads back what the sweep solved."""
    weight = random_weight(seed=3)
    X = correlated_inputs(256, 1024) * torch.logspace(-2, 1, 256).unsqueeze(1)
    plain = BnbConfig(quant_type=quant_type)
    ordered = BnbConfig(quant_type=quant_type, act_order=True)
    in_order, in_order_values, _ = quantize_bnb(weight, plain, hessian_of(X))
    by_activity, by_activity_values, stats = quantize_bnb(weight, ordered, hessian_of(X))
    error = lambda values: float(((weight.float() - values) @ X).norm())  # noqa: E731
    assert error(by_activity_values) < 0.95 * error(in_order_values)
    assert stats["calibrated"] is True
    assert by_activity.keys() == in_order.keys()
    assert all(torch.equal(by_activity[k], in_order[k]) for k in by_activity if k != "weight")  # scales, maps
    assert not torch.equal(by_activity["weight"], in_order["weight"])
    assert torch.equal(dequantize_bnb(by_activity, (64, 256)), by_activity_values)


def test_calibrated_zeroes_dead_inputs():
    weight = random_weight()
    X = correlated_inputs(256, 512)
    X[5] = 0
    hessian = hessian_of(X)
    _, dequantized, stats = quantize_bnb(weight, BnbConfig(), hessian)
    assert stats["dead_inputs"] == 1
    assert (dequantized[:, 5] == 0).all()
    assert (dequantized[:, 6] != 0).any()


def test_calibrated_falls_back_to_plain_when_blocks_straddle_rows(caplog):
    weight = random_weight(64, 96)
    config = BnbConfig()
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        tensors, _, stats = quantize_bnb(weight, config, torch.eye(96))
    assert "not a multiple of the block size" in caplog.text
    assert stats["calibrated"] is False
    reference = bitsandbytes_reference(weight, config)
    assert all(torch.equal(tensors[key], reference[key]) for key in reference)


# --- config.json ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_quantization_config_matches_transformers(config):
    ours = bnb_quantization_config(config, ["lm_head", "model.layers.0.mlp.down_proj"])
    theirs = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head", "model.layers.0.mlp.down_proj"],
    ).to_dict()
    assert ours == theirs


# --- end to end against transformers ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def quantized_linear_names(state_dict: dict) -> list[str]:
    """The decoder-layer Linears (transformers never quantizes lm_head)."""
    modules = [key.removesuffix(".weight") for key in state_dict if key.endswith(".weight")]
    return sorted(module for module in modules if module.endswith(LINEAR_SUFFIXES))


@pytest.mark.parametrize("config", [BnbConfig("nf4", True), BnbConfig("fp4", False)], ids=config_id)
def test_plain_tensors_match_what_transformers_saves(tiny_llama_dir, tmp_path, config):
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.quant_type,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        device_map="cpu",
    )
    quantized.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    base = load_file(tiny_llama_dir / "model.safetensors")
    names = quantized_linear_names(base)
    assert len(names) == 2 * len(LINEAR_SUFFIXES)
    assert "lm_head.weight" in saved and saved["lm_head.weight"].dtype == torch.bfloat16
    for name in names:
        tensors, _, _ = quantize_bnb(base[f"{name}.weight"], config)
        theirs = {key.removeprefix(f"{name}."): value for key, value in saved.items() if key.startswith(f"{name}.weight")}
        assert tensors.keys() == theirs.keys(), name
        for key, value in theirs.items():
            assert (tensors[key].dtype, tensors[key].shape) == (value.dtype, value.shape), f"{name}.{key}"
            assert torch.equal(tensors[key], value), f"{name}.{key}"


def test_transformers_loads_a_calibrated_checkpoint_we_wrote(tiny_llama_dir, tmp_path):
    config = BnbConfig("nf4", double_quant=True)
    base = load_file(tiny_llama_dir / "model.safetensors")
    names = quantized_linear_names(base)
    output = dict(base)
    expected_values = {}
    for name in names:
        weight = output.pop(f"{name}.weight")
        hessian = hessian_of(correlated_inputs(weight.shape[1], 256))
        tensors, dequantized, stats = quantize_bnb(weight, config, hessian)
        assert stats["calibrated"] is True
        output.update({f"{name}.{key}": value for key, value in tensors.items()})
        expected_values[name] = dequantized
    save_file(output, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    model_config["quantization_config"] = bnb_quantization_config(config, ["lm_head"])
    (tmp_path / "config.json").write_text(json.dumps(model_config))

    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    modules = dict(model.named_modules())
    for name in names:
        parameter = modules[name].weight
        assert parameter.quant_state is not None, name
        loaded = bnb.dequantize_4bit(parameter.data, parameter.quant_state).float()
        assert torch.equal(loaded, expected_values[name]), name
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
