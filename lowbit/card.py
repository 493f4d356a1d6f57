"""The model card (README.md) of a lowbit checkpoint, built from its manifest.

`build_model_card` returns a `huggingface_hub.ModelCard`: YAML metadata the Hub
indexes (base model, "quantized" relation, tags) and a Markdown body a reader
can act on (settings, size, evaluation, how to load it, calibration, a plot of
the per-layer error, drawn by lowbit/error_plot.py).
Everything here is pure: manifest in, text out, and nothing in the card is a
local filesystem path: a local source is "a local checkpoint" (unless the
user names its Hub id), a local calibration or evaluation file is named by
its file name only.
"""

import re
from pathlib import PurePosixPath

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from lowbit.error_plot import ERROR_MEANING, LAYER_ERRORS_FILE, layer_errors
from lowbit.error_plot import layer_error_svg as heat_map_svg
from lowbit.format_plot import FORMATS_FILE, chosen_formats, format_map_svg, format_table
from lowbit.quantize.nf4 import VLLM_REFUSAL as VLLM_BNB_REFUSAL
from lowbit.quantize.pack import vllm_refusal
from lowbit.quantize.settings import BNB_METHODS

__all__ = ["FORMATS_FILE", "LAYER_ERRORS_FILE", "build_model_card", "card_tags", "chosen_formats", "format_map_svg",
           "layer_error_svg", "layer_errors"]

_METHOD_NAMES = {
    "gptq": "GPTQ",
    "rtn": "round-to-nearest (RTN)",
    "nf4": "bitsandbytes NF4",
    "fp4": "bitsandbytes FP4",
}
# Settings that mean nothing for a method, left out of its card (the manifest keeps them all).
_NOT_FOR = {
    "gptq": {"double_quant", "skip"},
    "rtn": {"double_quant", "skip", "damp", "act_order", "static_groups", "true_sequential", "fp_targets"},
    "nf4": {"group_size", "sym", "static_groups", "true_sequential", "awq_scales"},
    "fp4": {"group_size", "sym", "static_groups", "true_sequential", "awq_scales"},
}
# rtn, nf4, fp4: only when calibrated
_CALIBRATED_ONLY = {"damp", "fast_matmul", "fp_targets", "act_order", "first_position_share"}


def build_model_card(manifest: dict, repo_id: str | None, base_model: str | None = None) -> ModelCard:
    """The card for the checkpoint described by `manifest`, to be published as `repo_id`.

    base_model: the Hub id of the source model, when the manifest cannot tell (quantized from a local copy).
    """
    base_model = base_model or _hub_base_model(manifest)
    data = ModelCardData(
        base_model=base_model,
        # Set explicitly: the Hub tends to infer "finetune" for safetensors quants.
        base_model_relation="quantized" if base_model else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=card_tags(manifest),
    )
    sections = [
        _summary(manifest, repo_id, base_model),
        _settings_section(manifest),
        _size_section(manifest),
        _eval_section(manifest, base_model),
        _usage_section(manifest, repo_id),
        _calibration_section(manifest),
        _format_section(manifest),
        _layer_error_section(manifest),
        _provenance(manifest),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def card_tags(manifest: dict) -> list[str]:
    method = manifest.get("method", "gptq")
    tags = ["lowbit", method, f"{_bits(manifest)}-bit"]
    tags += ["bitsandbytes"] if method in BNB_METHODS else ["gptq"]
    return list(dict.fromkeys(tags))  # unique, in order


def layer_error_svg(manifest: dict) -> str:
    """The per-layer error heat map (lowbit/error_plot.py), titled with the method."""
    return heat_map_svg(manifest, _method_name(manifest))


# --- pieces of the card ------------------------------------------------------


def _summary(manifest: dict, repo_id: str | None, base: str | None) -> str:
    source = manifest.get("source") or {}
    name = repo_id.split("/")[-1] if repo_id else "Quantized model"
    base_text = f"[{base}](https://huggingface.co/{base})" if base else _local_source_name(source)
    architecture = f" ({source['architecture']})" if source.get("architecture") else ""
    revision = f" at revision `{source['revision']}`" if base and source.get("revision") else ""
    tool = manifest.get("tool") or {}
    made_by = " ".join(str(part) for part in (tool.get("name", "lowbit"), tool.get("version")) if part)
    return (
        f"# {name}\n\n"
        f"{base_text}{architecture}{revision} quantized to {_bits(manifest)} bits with {_method_name(manifest)} "
        f"by {made_by}. Weights are in safetensors; `config.json` carries the quantization config."
    )


def card_settings(manifest: dict) -> list[tuple[str, object]]:
    """(setting, value) rows: the method first, then each setting of that method once."""
    method = manifest.get("method", "?")
    left_out = {"method"} | _NOT_FOR.get(method, set())
    if method != "gptq" and not isinstance(manifest.get("calibration"), dict):
        left_out |= _CALIBRATED_ONLY
    settings = manifest.get("settings") or {}
    return [("method", method)] + sorted((k, v) for k, v in settings.items() if k not in left_out)


def _settings_section(manifest: dict) -> str:
    rows = card_settings(manifest)
    lines = ["## Quantization settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    return "\n".join(lines)


def _size_section(manifest: dict) -> str:
    lines = ["## Size", ""]
    bpw = manifest.get("bits_per_weight")
    if isinstance(bpw, (int, float)):
        lines.append(f"- Bits per weight: **{bpw:.2f}** (scales and zero points included)")
    output_bytes = manifest.get("output_bytes")
    source = manifest.get("source") or {}
    base_bytes = source.get("size_bytes")
    if isinstance(output_bytes, int):
        lines.append(f"- Checkpoint size: **{_human_bytes(output_bytes)}**")
        if isinstance(base_bytes, int) and base_bytes > 0 and output_bytes > 0:
            lines.append(
                f"- Base model ({source.get('dtype', 'original dtype')}): {_human_bytes(base_bytes)}; "
                f"this checkpoint is {output_bytes / base_bytes:.1%} of it ({base_bytes / output_bytes:.2f}x smaller)"
            )
    if isinstance(source.get("num_parameters"), int):
        lines.append(f"- Parameters: {source['num_parameters']:,}")
    return "\n".join(lines) if len(lines) > 2 else ""


def _eval_section(manifest: dict, base_model: str | None) -> str:
    from lowbit.evals.report import report_markdown

    report = manifest.get("eval")
    if not isinstance(report, dict):
        return ""
    # rendered again rather than the stored Markdown: that one may name local paths
    return "## Evaluation\n\n" + report_markdown(public_report(report, base_model)).strip()


def public_report(report: dict, base_model: str | None) -> dict:
    """The report with what would name local paths replaced: the base model and a dataset file."""
    dataset = report.get("dataset")
    named = dataset in ("wikitext2", "c4")
    return {
        **report,
        "base": base_model or "a local checkpoint",
        "dataset": dataset if named or dataset is None else _local_file_name(dataset),
        "quantized": None,
        "dataset_file": None,
    }


def _usage_section(manifest: dict, repo_id: str | None) -> str:
    model = repo_id or "path/to/this/folder"
    is_bnb = manifest.get("method") in BNB_METHODS
    install = "pip install -U transformers bitsandbytes" if is_bnb else "pip install -U transformers gptqmodel optimum"
    refusal = vllm_refusal_of(manifest)
    if refusal:
        vllm = f"vLLM does not load this checkpoint: {refusal}. Use transformers (above)."
    else:
        vllm = f"""With vLLM:

```python
from vllm import LLM, SamplingParams

llm = LLM(model="{model}")
print(llm.generate("The capital of France is", SamplingParams(max_tokens=20))[0].outputs[0].text)
```"""
    return f"""## Use it

With transformers:

```bash
{install}
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{model}")
inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

{vllm}"""


def vllm_refusal_of(manifest: dict) -> str | None:
    """Why vLLM would refuse the checkpoint the manifest describes; None when it loads it."""
    if manifest.get("method") in BNB_METHODS:
        return VLLM_BNB_REFUSAL
    return vllm_refusal(manifest_codes(manifest))


def manifest_codes(manifest: dict) -> list[tuple[int, bool]]:
    """A GPTQ checkpoint's (bits, symmetric) codes from its manifest: the settings', and each Linear's that a size
    budget gave another width (every width shares the grid's symmetry; 16 is unquantized)."""
    settings = manifest.get("settings") or {}
    bits, sym = settings.get("bits", 4), settings.get("sym", True)
    chosen = {b for b, _ in chosen_formats(manifest).values()}
    return [(bits, sym)] + [(b, sym) for b in sorted(chosen - {16, bits})]


def _calibration_section(manifest: dict) -> str:
    calibration = manifest.get("calibration")
    if not isinstance(calibration, dict):
        return f"## Calibration\n\nNone: {_method_name(manifest)} as run here uses no calibration data."
    lines = ["## Calibration", ""]
    if calibration.get("source"):
        source = calibration["source"]
        named = calibration.get("kind") == "named" or source in ("pydoc", "c4", "wikitext2")
        lines.append(f"- Source: `{source}`" if named else f"- Source: {_local_file_name(source)}")
    if calibration.get("source_sha256"):
        lines.append(f"- Source sha256: `{calibration['source_sha256']}`")
    if calibration.get("nsamples") is not None:
        lines.append(f"- Windows: {calibration['nsamples']} x {calibration.get('seqlen', '?')} tokens")
    if calibration.get("seed") is not None:
        lines.append(f"- Seed: {calibration['seed']}")
    if "chat_template" in calibration:
        lines.append(f"- Chat template applied: {'yes' if calibration['chat_template'] else 'no'}")
    if calibration.get("start_tokens"):
        lines.append(f"- Each window begins with the tokenizer's start tokens {calibration['start_tokens']} (its BOS)")
    if calibration.get("windows_sha256"):
        lines.append(f"- Token windows sha256: `{calibration['windows_sha256']}`")
    if calibration.get("tokens_file"):
        lines.append(f"- The exact token ids are in `{calibration['tokens_file']}`.")
    return "\n".join(lines)


def _format_section(manifest: dict) -> str:
    """Under a size budget: the format each Linear got, as a picture and as a table."""
    if not chosen_formats(manifest):
        return ""
    target = manifest["settings"]["target_bpw"]
    lines = [
        "## Formats chosen under the size budget",
        "",
        f"![Format of each Linear]({FORMATS_FILE})",
        "",
        f"`--target-bpw {target:g}`: each projection group of each decoder layer got the format that removed the "
        f"most output error per extra byte, within the budget ({manifest.get('bits_per_weight', 0):.3f} bits per "
        f"weight used). Bits by layer and module (a group size where it is not the base's; 16: left unquantized):",
        "",
        *format_table(manifest),
    ]
    return "\n".join(lines)


def _layer_error_section(manifest: dict) -> str:
    errors = layer_errors(manifest)
    if not errors:
        return ""
    worst = sorted(errors, key=lambda item: item[1], reverse=True)[:5]
    lines = [
        "## Per-layer quantization error",
        "",
        f"![Per-layer quantization error]({LAYER_ERRORS_FILE})",
        "",
        f"One cell per quantized Linear, decoder layers across, module kinds down. The error of a module is its "
        f"{ERROR_MEANING}.",
        "",
        "Largest errors:",
        "",
        "| module | error |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {error:.4g} |" for name, error in worst]
    return "\n".join(lines)


def _provenance(manifest: dict) -> str:
    tool = manifest.get("tool") or {}
    created = f" on {manifest['created']}" if manifest.get("created") else ""
    return (
        f"## Provenance\n\nMade with {tool.get('name', 'lowbit')} {tool.get('version', '')}{created}. "
        "The full record (settings, source, per-file sha256) is `lowbit_manifest.json`."
    )


# --- small helpers -----------------------------------------------------------


def _hub_base_model(manifest: dict) -> str | None:
    """The source model's Hub id: the source as given when it reads as one ("namespace/name"), or the
    repo of a Hugging Face cache folder (".../models--namespace--name/snapshots/<sha>")."""
    model = (manifest.get("source") or {}).get("model")
    if not isinstance(model, str):
        return None
    cached = _HF_CACHE_SNAPSHOT.search(model)
    if cached:
        model = f"{cached['namespace']}/{cached['name']}"
    elif model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return None
    return model


_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<namespace>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def _local_source_name(source: dict) -> str:
    # A local path says nothing useful to readers and may reveal a home folder.
    return "A local checkpoint" if source.get("model") else "A model"


def _local_file_name(path: str) -> str:
    return f"a local file `{PurePosixPath(str(path).replace(chr(92), '/')).name}`"


def _method_name(manifest: dict) -> str:
    method = manifest.get("method", "?")
    return _METHOD_NAMES.get(method, method)


def _bits(manifest: dict) -> int:
    bits = (manifest.get("settings") or {}).get("bits")
    return int(bits) if isinstance(bits, (int, float)) else 4


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")
