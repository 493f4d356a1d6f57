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


def test_card_offers_vllm_only_for_the_codes_vllm_loads():
    manifest = sample_manifest()
    manifest["settings"].update(bits=3, sym=False)
    text = build_model_card(manifest, "alice/m-3bit").text
    assert "from vllm import" not in text
    assert "vLLM does not load this checkpoint" in text and "3-bit asymmetric" in text
    assert 'from_pretrained("alice/m-3bit"' in text

    budget = sample_manifest()  # 4-bit, a budget gave one Linear 8 bits and one 16: vLLM loads it
    budget["settings"]["target_bpw"] = 5.0
    for name, info in budget["layers"].items():
        info.update(bits=4, group_size=128)
    budget["layers"]["model.layers.0.mlp.down_proj"]["bits"] = 8
    budget["layers"]["model.layers.1.mlp.down_proj"]["bits"] = 16
    assert "from vllm import" in build_model_card(budget, "alice/m").text
    budget["layers"]["model.layers.0.mlp.down_proj"]["bits"] = 3  # a width vLLM refuses, in one Linear only
    assert "3-bit symmetric" in build_model_card(budget, "alice/m").text
    budget["layers"]["model.layers.0.mlp.down_proj"]["bits"] = 8
    budget["settings"]["sym"] = False
    assert "from vllm import" not in build_model_card(budget, "alice/m").text


def test_card_for_nf4_loads_through_bitsandbytes_in_transformers():
    manifest = sample_manifest("nf4")
    text = build_model_card(manifest, "alice/m-nf4").text
    assert "from vllm import" not in text and "vLLM no longer loads bitsandbytes checkpoints" in text
    assert "gptqmodel" not in text
    assert set(card_tags(manifest)) == {"lowbit", "nf4", "4-bit", "bitsandbytes"}


def test_card_renders_the_eval_from_the_report_and_warns_on_contamination():
    manifest = sample_manifest()
    manifest["eval"]["markdown"] = "| what | value |\n|---|---|\n| Base model | /home/someone/base |"  # as stored
    text = build_model_card(manifest, "alice/m").text
    assert "| Perplexity, base | 20.1234 |" in text and "/home/someone" not in text

    manifest = sample_manifest()
    manifest["eval"]["contamination"] = {"overlap_rate": 0.31, "contaminated": True}
    assert "Warning: the calibration data overlaps" in build_model_card(manifest, "alice/m").text


def settings_rows(text: str) -> list[str]:
    section = text.split("## Quantization settings")[1].split("##")[0]
    return [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]


def test_card_lists_each_setting_once_and_only_those_of_its_method():
    all_settings = {"method": "gptq", "bits": 4, "group_size": 64, "sym": True, "act_order": False,
                    "static_groups": False, "damp": 0.01, "true_sequential": True, "fast_matmul": True, "double_quant": True,
                    "skip": None}
    manifest = sample_manifest("gptq")
    manifest["settings"] = dict(all_settings)
    rows = settings_rows(build_model_card(manifest, "alice/m").text)
    assert rows.count("method") == 1 and len(rows) == len(set(rows))
    assert "double_quant" not in rows and "skip" not in rows and {"group_size", "damp", "act_order"} <= set(rows)

    manifest = sample_manifest("nf4")
    manifest["settings"] = {**all_settings, "method": "nf4"}
    manifest["calibration"] = None
    rows = settings_rows(build_model_card(manifest, "alice/m").text)
    assert "double_quant" in rows and not {"group_size", "sym", "act_order", "damp", "true_sequential",
                                           "fast_matmul"} & set(rows)

    manifest["calibration"] = sample_manifest()["calibration"]  # calibrated NF4 has a damping, passes, an order
    assert {"damp", "fast_matmul", "act_order"} <= set(settings_rows(build_model_card(manifest, "alice/m").text))

    manifest = sample_manifest("rtn")
    manifest["settings"] = {**all_settings, "method": "rtn"}
    rows = settings_rows(build_model_card(manifest, "alice/m").text)
    assert set(rows) == {"method", "bits", "group_size", "sym", "fast_matmul"}  # calibrated for its scale search
    manifest["calibration"] = None
    rows = settings_rows(build_model_card(manifest, "alice/m").text)
    assert set(rows) == {"method", "bits", "group_size", "sym"}


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


def test_local_paths_appear_nowhere_in_the_card():
    manifest = sample_manifest()
    manifest["source"]["model"] = "/home/someone/private/models/my-llama"
    manifest["eval"].update(base="/home/someone/private/models/my-llama", dataset="/home/someone/texts/eval.txt",
                            quantized="/home/someone/out/q", dataset_file="/home/someone/texts/eval.txt")
    manifest["calibration"].update(source="/home/someone/texts/calib.jsonl", kind="jsonl")
    card = build_model_card(manifest, "alice/m")
    assert card.data.base_model is None
    assert getattr(card.data, "base_model_relation", None) is None
    assert "/home/someone" not in card.text and "my-llama" not in card.text
    assert "A local checkpoint" in card.text and "| Base model | a local checkpoint |" in card.text
    assert "a local file `eval.txt`" in card.text and "a local file `calib.jsonl`" in card.text

    named = build_model_card(manifest, "alice/m", base_model="acme/llama-7b").text
    assert "| Base model | acme/llama-7b |" in named and "/home/someone" not in named


def test_base_model_from_a_hub_cache_folder_or_given_explicitly():
    manifest = sample_manifest()
    manifest["source"]["model"] = "/home/ci/.cache/huggingface/hub/models--microsoft--phi-4/snapshots/187ef07/"
    assert build_model_card(manifest, "alice/m").data.base_model == "microsoft/phi-4"

    manifest["source"]["model"] = "/data/phi-4-local"
    card = build_model_card(manifest, "alice/m", base_model="microsoft/phi-4")
    assert card.data.base_model == "microsoft/phi-4" and card.data.base_model_relation == "quantized"
    assert "[microsoft/phi-4](https://huggingface.co/microsoft/phi-4)" in card.text


def test_layer_error_plot_is_a_heat_map_of_layers_by_module_with_a_legend():
    manifest = sample_manifest()
    root = ET.fromstring(layer_error_svg(manifest))
    cells = {rect.find(f"{SVG_NS}title").text.split(":")[0]: rect for rect in root.iter(f"{SVG_NS}rect")
             if rect.find(f"{SVG_NS}title") is not None}
    assert set(cells) == set(manifest["layers"])
    # one column per layer, one row per module kind
    assert len({cell.get("x") for cell in cells.values()}) == 2 and len({cell.get("y") for cell in cells.values()}) == 2
    assert cells["model.layers.0.self_attn.q_proj"].get("x") == cells["model.layers.0.mlp.down_proj"].get("x")

    def darkness(name: str) -> int:
        fill = cells[name].get("fill")
        return -sum(int(fill[i : i + 2], 16) for i in (1, 3, 5))

    by_error = sorted(manifest["layers"], key=lambda name: manifest["layers"][name]["error"])
    assert [darkness(name) for name in by_error] == sorted(darkness(name) for name in by_error)
    text = " ".join(root.itertext())
    assert "self_attn.q_proj" in text and "mlp.down_proj" in text and "decoder layer" in text
    assert "relative output error" in text and "log scale" in text  # errors 0.01 .. 0.4 span 40x
    legend = [rect for rect in root.iter(f"{SVG_NS}rect") if rect.find(f"{SVG_NS}title") is None]
    assert len(legend) > 10  # background + the colour bar's steps


def test_layer_error_svg_without_errors_is_still_valid():
    manifest = copy.deepcopy(sample_manifest())
    manifest["layers"] = {"model.layers.0.mlp.up_proj": {"error": float("nan")}}
    root = ET.fromstring(layer_error_svg(manifest))
    assert "no per-layer errors" in "".join(root.itertext())


def budget_manifest() -> dict:
    """sample_manifest under --target-bpw: layer 0's q_proj in 8 bits, layer 1's down_proj left in 16."""
    manifest = copy.deepcopy(sample_manifest())
    manifest["settings"]["target_bpw"] = 5.0
    chosen = {"model.layers.0.self_attn.q_proj": (8, 128), "model.layers.1.mlp.down_proj": (16, None)}
    for name, entry in manifest["layers"].items():
        entry["bits"], entry["group_size"] = chosen.get(name, (4, 128))
    return manifest


def test_card_shows_the_budget_map_as_a_picture_and_a_table():
    from lowbit.card import FORMATS_FILE, format_map_svg

    manifest = budget_manifest()
    root = ET.fromstring(format_map_svg(manifest))
    cells = {rect.find(f"{SVG_NS}title").text: rect.get("fill") for rect in root.iter(f"{SVG_NS}rect")
             if rect.find(f"{SVG_NS}title") is not None}
    assert len(cells) == 4  # 2 layers x 2 module kinds
    by_label = {title.split(": ", 1)[1]: fill for title, fill in cells.items()}
    assert len(set(by_label.values())) == 3  # base, 8-bit and 16-bit each have their colour
    text = " ".join(root.itertext())
    assert "4-bit, group 128 (base): 2 Linears" in text and "8-bit, group 128: 1 Linears" in text
    assert "16-bit (unquantized): 1 Linears" in text and "decoder layer" in text

    body = str(build_model_card(manifest, "user/model"))
    assert f"![Format of each Linear]({FORMATS_FILE})" in body
    assert "| layer | q_proj | down_proj |" in body
    assert "| 0 | 8 | 4 |" in body and "| 1 | 4 | 16 |" in body
    assert "Formats chosen" not in str(build_model_card(sample_manifest(), "user/model"))  # no budget, no map
