"""The model card and the per-layer error plot built from a manifest."""

import copy
import xml.etree.ElementTree as ET

from huggingface_hub import ModelCard

from lowbit.card import LAYER_ERRORS_FILE, build_model_card, card_tags, layer_error_svg

SVG_NS = "{http://www.w3.org/2000/svg}"


def sample_manifest(method: str = "gptq") -> dict:
    """A manifest shaped as DESIGN.md describes, for a 2-layer model."""
    layers = {}
    for i in range(2):
        for proj, error in (("self_attn.q_proj", 0.01), ("mlp.down_proj", 0.2)):
            layers[f"model.layers.{i}.{proj}"] = {"error": error * (i + 1), "damp": 0.01}
    return {
        "format": "lowbit-manifest",
        "version": 1,
        "tool": {"name": "lowbit", "version": "0.1.0"},
        "created": "2026-11-29T01:00:00Z",
        "method": method,
        "settings": {"bits": 4, "group_size": 128, "sym": True, "desc_act": False},
        "source": {
            "model": "HuggingFaceTB/SmolLM2-135M",
            "revision": "abc123",
            "architecture": "LlamaForCausalLM",
            "dtype": "bfloat16",
            "num_parameters": 134515008,
            "size_bytes": 269060552,
        },
        "calibration": {
            "source": "wikitext-2-raw-v1:train",
            "source_sha256": "f" * 64,
            "nsamples": 128,
            "seqlen": 2048,
            "seed": 0,
            "chat_template": False,
            "windows_sha256": "e" * 64,
            "tokens_file": "lowbit_calibration.json",
        },
        "layers": layers,
        "files": {},
        "output_bytes": 89686851,
        "bits_per_weight": 4.25,
        "eval": {
            "ppl_base": 20.1234,
            "ppl_quantized": 21.5678,
            "ppl_delta": 1.4444,
            "ppl_ratio": 1.0718,
            "kld": {"mean": 0.0412, "median": 0.02, "p99": 0.51, "p999": 1.2, "max": 3.4},
            "same_top": 0.9123,
            "tokens": 286720,
            "windows": 140,
            "seqlen": 2048,
            "dataset": "wikitext-2-raw-v1:test",
            "protocol": "gptq",
            "contamination": {"overlap_rate": 0.0, "contaminated": False},
        },
    }


def test_card_metadata_declares_a_quantized_derivative():
    card = ModelCard(str(build_model_card(sample_manifest(), "alice/SmolLM2-135M-GPTQ-4bit")))  # round trip
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"lowbit", "gptq", "4-bit"} <= set(card.data.tags)


def test_card_body_has_settings_size_eval_usage_and_calibration():
    text = build_model_card(sample_manifest(), "alice/SmolLM2-135M-GPTQ-4bit").text
    assert "| group_size | 128 |" in text
    assert "**4.25**" in text  # bits per weight
    assert "33.3%" in text  # 89.7 MB of a 269.1 MB base
    assert "| Perplexity, base | 20.1234 |" in text
    assert "| Perplexity, quantized | 21.5678 |" in text
    assert "| Same top token | 91.23% |" in text
    assert "do not overlap" in text
    assert 'LLM(model="alice/SmolLM2-135M-GPTQ-4bit")' in text
    assert 'from_pretrained("alice/SmolLM2-135M-GPTQ-4bit"' in text
    assert "gptqmodel" in text
    assert "wikitext-2-raw-v1:train" in text and "128 x 2048" in text
    assert f"]({LAYER_ERRORS_FILE})" in text


def test_card_for_nf4_loads_through_bitsandbytes():
    manifest = sample_manifest("nf4")
    text = build_model_card(manifest, "alice/m-nf4").text
    assert 'LLM(model="alice/m-nf4", quantization="bitsandbytes")' in text
    assert "gptqmodel" not in text
    assert set(card_tags(manifest)) == {"lowbit", "nf4", "4-bit", "bitsandbytes"}


def test_card_prefers_the_eval_markdown_and_warns_on_contamination():
    manifest = sample_manifest()
    manifest["eval"]["markdown"] = "| what | value |\n|---|---|\n| custom row | 42 |"
    text = build_model_card(manifest, "alice/m").text
    assert "| custom row | 42 |" in text
    assert "Perplexity, base" not in text

    manifest = sample_manifest()
    manifest["eval"]["contamination"] = {"overlap_rate": 0.31, "contaminated": True}
    assert "Warning: the calibration data overlaps" in build_model_card(manifest, "alice/m").text


def test_card_tolerates_missing_pieces():
    manifest = sample_manifest()
    manifest["eval"] = {"ppl_base": 10.0}  # almost nothing
    manifest["calibration"] = None
    del manifest["bits_per_weight"]
    manifest["layers"] = {}
    text = build_model_card(manifest, None).text
    assert "| Perplexity, base | 10.0000 |" in text
    assert "KL divergence" not in text
    assert "no calibration data" in text
    assert LAYER_ERRORS_FILE not in text
    assert "path/to/this/folder" in text

    manifest["eval"] = None
    assert "## Evaluation" not in build_model_card(manifest, "alice/m").text


def test_local_source_is_not_declared_as_base_model_nor_exposed():
    manifest = sample_manifest()
    manifest["source"]["model"] = "/home/someone/private/models/my-llama"
    card = build_model_card(manifest, "alice/m")
    assert card.data.base_model is None
    assert getattr(card.data, "base_model_relation", None) is None
    assert "my-llama" in card.text and "/home/someone" not in card.text


def test_base_model_from_a_hub_cache_folder_or_given_explicitly():
    manifest = sample_manifest()
    manifest["source"]["model"] = "/home/ci/.cache/huggingface/hub/models--microsoft--phi-4/snapshots/187ef07/"
    assert build_model_card(manifest, "alice/m").data.base_model == "microsoft/phi-4"

    manifest["source"]["model"] = "/data/phi-4-local"
    card = build_model_card(manifest, "alice/m", base_model="microsoft/phi-4")
    assert card.data.base_model == "microsoft/phi-4" and card.data.base_model_relation == "quantized"
    assert "[microsoft/phi-4](https://huggingface.co/microsoft/phi-4)" in card.text


def test_layer_error_svg_draws_one_bar_per_module_scaled_to_the_largest():
    manifest = sample_manifest()
    root = ET.fromstring(layer_error_svg(manifest))
    bars = [rect for rect in root.iter(f"{SVG_NS}rect") if rect.find(f"{SVG_NS}title") is not None]
    assert len(bars) == len(manifest["layers"])
    heights = {bar.find(f"{SVG_NS}title").text.split(":")[0]: float(bar.get("height")) for bar in bars}
    tallest = max(heights, key=heights.get)
    assert tallest == "model.layers.1.mlp.down_proj"
    ratio = heights["model.layers.0.self_attn.q_proj"] / heights[tallest]
    assert abs(ratio - 0.01 / 0.4) < 1e-3


def test_layer_error_svg_without_errors_is_still_valid():
    manifest = copy.deepcopy(sample_manifest())
    manifest["layers"] = {"model.layers.0.mlp.up_proj": {"error": float("nan")}}
    root = ET.fromstring(layer_error_svg(manifest))
    assert "no per-layer errors" in "".join(root.itertext())
