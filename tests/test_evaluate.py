"""lowbit.evals.evaluate on tiny random Llama models: layer-by-layer scoring against plain transformers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lowbit.evals.evaluate as evaluate_module
from lowbit.evals.datasets import eval_windows, load_eval_text
from lowbit.evals.evaluate import (
    EvalOptions,
    chunk_log_probs,
    default_base,
    evaluate,
    final_hidden_states,
    perplexity,
    score,
)
from lowbit.errors import UsageError
from lowbit.quantize.checkpoint import SafetensorsCheckpoint
from lowbit.quantize.loader import DenseWeights, load_dequantized_model
from lowbit.quantize.stream import build_skeleton, live_parameter_bytes, run_layer

VOCAB = 256
SEQLEN = 32
CPU = EvalOptions(seqlen=SEQLEN, device="cpu", dtype="float32")

EVAL_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening before the sun went down. "
    "He polished the great lens, trimmed the wick and wrote the weather into a leather book. "
    "Ships passing the rocks at night saw the beam sweep across the water once every ten seconds, "
    "and the fishermen of the village set their clocks by it when the church bell was silent. "
    "In winter the storms came from the north and the waves broke over the lower gallery, "
    "leaving salt on the windows that he scraped away with a knife each morning. "
)
UNRELATED_TEXT = (
    "Bread dough rises best in a warm kitchen, covered with a damp cloth for about two hours, "
    "after which it is folded, shaped into loaves and baked in a very hot oven until golden brown "
    "and hollow sounding when tapped on the bottom with a finger, then left to cool on a rack. "
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose ids are the UTF-8 bytes of the text (vocabulary 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def tiny_config(tied: bool) -> LlamaConfig:
    # initializer_range 0.2 gives peaked next-token distributions, so the figures are not all near uniform
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied, initializer_range=0.2)


def save_model(model: LlamaForCausalLM, folder: Path) -> Path:
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tied and an untied model, and a perturbed copy of the untied one."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tied = save_model(LlamaForCausalLM(tiny_config(True)), root / "tied")
    untied_model = LlamaForCausalLM(tiny_config(False))
    untied = save_model(untied_model, root / "untied")
    with torch.no_grad():
        for name, param in untied_model.named_parameters():
            if name.startswith("model.layers.1.") and name.endswith("proj.weight"):
                param.add_(0.05 * torch.randn_like(param))
    perturbed = save_model(untied_model, root / "perturbed")
    return {"tied": tied, "untied": untied, "perturbed": perturbed}


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (3, SEQLEN), generator=torch.Generator().manual_seed(1))


def reference_model(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_ppl(model, windows: torch.Tensor) -> float:
    """transformers' loss per window (mean over its seqlen-1 predictions), averaged over windows."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    return math.exp(float(torch.stack(losses).mean()))


def reference_log_probs(model, windows: torch.Tensor) -> torch.Tensor:
    """[windows * (seqlen-1), vocab] full log-softmax of the predicting positions."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])


def head(folder: Path) -> torch.Tensor:
    return DenseWeights(folder).lm_head_weight().float()


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_perplexity_matches_transformers(models, windows, kind):
    folder = models[kind]
    assert ("lm_head.weight" in SafetensorsCheckpoint(folder)) == (kind == "untied")  # the tied path is exercised
    model = reference_model(folder)
    progress = []
    hidden = final_hidden_states(folder, windows, CPU, lambda *p: progress.append(p))
    with torch.no_grad():
        expected_hidden = model.model(input_ids=windows).last_hidden_state
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-4, atol=1e-5)
    assert progress[-1] == ("layers", 3, 3)

    expected = reference_ppl(model, windows)
    single = perplexity(hidden, windows, head(folder), chunk_tokens=5)
    assert single["ppl"] == pytest.approx(expected, rel=1e-4)
    assert single["tokens"] == windows.shape[0] * (SEQLEN - 1)
    figures = score(hidden, hidden, windows, head(folder), head(folder), chunk_tokens=5)
    assert figures["ppl_base"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
def test_other_architectures_match_transformers(tmp_path, windows, arch):
    """Fused qkv/gate_up (Phi-3), attention biases (Qwen2), a checkpoint sharded over several files."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / arch, arch)
    assert len(list(folder.glob("*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hidden = final_hidden_states(folder, windows, CPU)
    assert perplexity(hidden, windows, head(folder), chunk_tokens=8)["ppl"] == pytest.approx(
        reference_ppl(model, windows), rel=1e-4)


def test_chunk_size_does_not_change_result(models, windows):
    base = final_hidden_states(models["untied"], windows, CPU)
    quant = final_hidden_states(models["perturbed"], windows, CPU)
    args = (base, quant, windows, head(models["untied"]), head(models["perturbed"]))
    full = score(*args, chunk_tokens=10**6)
    for chunk in (1, 7, SEQLEN - 1):
        figures = score(*args, chunk_tokens=chunk)
        assert figures["tokens"] == full["tokens"] == windows.shape[0] * (SEQLEN - 1)
        assert figures["same_top"] == full["same_top"]
        for key in ("ppl_base", "ppl_quantized", "ppl_ratio", "mean_log_ppl_ratio"):
            assert figures[key] == pytest.approx(full[key], rel=1e-6, abs=1e-6)  # float32 log-softmax rounding
        for key in full["kld"]:
            assert figures["kld"][key] == pytest.approx(full["kld"][key], rel=1e-5, abs=1e-9)
        for key in full["delta_p"]:
            assert figures["delta_p"][key] == pytest.approx(full["delta_p"][key], rel=1e-5, abs=1e-9)


def test_model_against_itself_has_no_divergence(models, windows):
    hidden = final_hidden_states(models["tied"], windows, CPU)
    figures = score(hidden, hidden, windows, head(models["tied"]), head(models["tied"]), chunk_tokens=7)
    assert all(abs(value) < 1e-6 for value in figures["kld"].values())
    assert figures["same_top"] == 1.0
    assert figures["ppl_delta"] == 0.0
    assert figures["ppl_ratio"] == 1.0
    assert figures["mean_log_ppl_ratio"] == 0.0
    assert figures["delta_p"] == {"mean": 0.0, "rms": 0.0}


def test_perturbed_model_matches_full_logits(models, windows):
    base_model, quant_model = reference_model(models["untied"]), reference_model(models["perturbed"])
    log_p = reference_log_probs(base_model, windows)
    log_q = reference_log_probs(quant_model, windows)
    kld = (log_p.exp() * (log_p - log_q)).sum(-1).double()
    targets = windows[:, 1:].reshape(-1, 1)
    p_target = log_p.gather(1, targets)[:, 0].double().exp()
    q_target = log_q.gather(1, targets)[:, 0].double().exp()
    delta_p = q_target - p_target

    base = final_hidden_states(models["untied"], windows, CPU)
    quant = final_hidden_states(models["perturbed"], windows, CPU)
    figures = score(base, quant, windows, head(models["untied"]), head(models["perturbed"]), chunk_tokens=7)

    assert figures["kld"]["mean"] > 1e-3  # the perturbation is visible
    assert figures["kld"]["mean"] == pytest.approx(float(kld.mean()), rel=1e-4)
    assert figures["kld"]["max"] == pytest.approx(float(kld.max()), rel=1e-4)
    median, p99 = np.percentile(kld.numpy(), [50, 99])
    assert figures["kld"]["median"] == pytest.approx(median, rel=1e-4)
    assert figures["kld"]["p99"] == pytest.approx(p99, rel=1e-4)
    same_top = float((log_p.argmax(-1) == log_q.argmax(-1)).double().mean())
    assert abs(figures["same_top"] - same_top) <= 1 / kld.numel()  # at most one near-tie flips
    assert figures["delta_p"]["mean"] == pytest.approx(float(delta_p.mean()), rel=1e-3, abs=1e-7)
    assert figures["delta_p"]["rms"] == pytest.approx(float(delta_p.square().mean().sqrt()), rel=1e-3)
    assert figures["ppl_base"] == pytest.approx(reference_ppl(base_model, windows), rel=1e-4)
    assert figures["ppl_quantized"] == pytest.approx(reference_ppl(quant_model, windows), rel=1e-4)
    assert figures["mean_log_ppl_ratio"] == pytest.approx(
        math.log(figures["ppl_quantized"] / figures["ppl_base"]), rel=1e-6)


def test_head_memory_is_bounded_by_the_chunk(models, monkeypatch):
    """Every logits tensor is [<= chunk, vocab], however long the windows are."""
    shapes = []

    def recording(hidden, head_weight):
        out = chunk_log_probs(hidden, head_weight)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(evaluate_module, "chunk_log_probs", recording)
    folder = models["untied"]
    for seqlen in (16, 64):
        long_windows = torch.randint(0, VOCAB, (2, seqlen), generator=torch.Generator().manual_seed(seqlen))
        hidden = final_hidden_states(folder, long_windows, CPU)
        shapes.clear()
        figures = score(hidden, hidden, long_windows, head(folder), head(folder), chunk_tokens=7)
        assert max(rows for rows, _ in shapes) == 7
        assert {vocab for _, vocab in shapes} == {VOCAB}
        assert sum(rows for rows, _ in shapes) == 2 * figures["tokens"]  # all of the scoring went through it
        shapes.clear()
        perplexity(hidden, long_windows, head(folder), chunk_tokens=7)
        assert max(rows for rows, _ in shapes) == 7


def test_one_decoder_layer_is_materialised_at_a_time(models, windows, monkeypatch):
    built, live_layers = [], []

    def capture_skeleton(config):
        built.append(build_skeleton(config))
        return built[-1]

    def checking_run_layer(layer, acts, device, update=True):
        model = built[-1]
        live_layers.append([i for i, decoder_layer in enumerate(model.model.layers)
                            if any(p.device.type != "meta" for p in decoder_layer.parameters())])
        assert model.model.embed_tokens.weight.device.type == "meta"
        return run_layer(layer, acts, device, update)

    monkeypatch.setattr(evaluate_module, "build_skeleton", capture_skeleton)
    monkeypatch.setattr(evaluate_module, "run_layer", checking_run_layer)
    final_hidden_states(models["untied"], windows, CPU)
    assert live_layers == [[0], [1], [2]]
    assert live_parameter_bytes(built[-1]) == 0  # the final norm is given back too


def test_bad_sizes_are_usage_errors(models, windows):
    hidden = final_hidden_states(models["tied"], windows, CPU)
    with pytest.raises(UsageError, match="chunk_tokens"):
        perplexity(hidden, windows, head(models["tied"]), chunk_tokens=0)
    for bad in ({"seqlen": 1}, {"chunk_tokens": 0}, {"max_windows": 0}):
        with pytest.raises(UsageError):
            EvalOptions(**bad)


@pytest.fixture(scope="module")
def eval_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text(EVAL_TEXT)
    return path


def test_lowbit_rtn_checkpoint_evaluates_against_its_base(models, eval_text_file, tmp_path):
    from lowbit.quantize.driver import QuantizeSettings, RunOptions, quantize_model

    base = models["untied"]
    quantized = tmp_path / "rtn"
    quantize_model(str(base), quantized, QuantizeSettings(method="rtn", bits=4, group_size=32),
                   options=RunOptions(device="cpu", dtype="float32"))
    assert default_base(quantized) == str(base)

    progress = []
    options = EvalOptions(seqlen=SEQLEN, max_windows=3, device="cpu", dtype="float32", chunk_tokens=10)
    report = evaluate(quantized, default_base(quantized), str(eval_text_file), options, lambda *p: progress.append(p))

    text, provenance = load_eval_text(str(eval_text_file))
    windows = eval_windows(text, byte_tokenizer(), SEQLEN, 3)
    assert report["ppl_base"] == pytest.approx(reference_ppl(reference_model(base), windows), rel=1e-4)
    with torch.no_grad():
        dequantized = load_dequantized_model(quantized).eval()
    assert report["ppl_quantized"] == pytest.approx(reference_ppl(dequantized, windows), rel=1e-4)
    assert report["ppl_quantized"] != pytest.approx(report["ppl_base"], rel=1e-6)
    assert report["kld"]["mean"] > 0
    assert report["tokens"] == 3 * (SEQLEN - 1)
    assert (report["windows"], report["seqlen"]) == (3, SEQLEN)
    assert report["dataset_sha256"] == provenance["sha256"]
    assert report["protocol"] == provenance["protocol"]
    assert report["contamination"] is None  # rtn keeps no calibration windows
    assert report["peak_host_bytes"] > 0 and report["peak_gpu_bytes"] is None
    assert ("base", 3, 3) in progress and ("quantized", 3, 3) in progress and progress[-1] == ("score", 3, 3)
    json.dumps(report)  # it goes into the manifest as is


def test_single_model_with_calibration_windows_reports_contamination(models, eval_text_file, tmp_path):
    import shutil

    from lowbit.manifest import save_windows

    folder = tmp_path / "model"
    shutil.copytree(models["tied"], folder)
    tokenizer = byte_tokenizer()
    options = EvalOptions(seqlen=SEQLEN, max_windows=2, device="cpu", dtype="float32")

    report = evaluate(folder, None, str(eval_text_file), options)
    windows = eval_windows(EVAL_TEXT, tokenizer, SEQLEN, 2)
    assert report["ppl"] == pytest.approx(reference_ppl(reference_model(folder), windows), rel=1e-4)
    assert "kld" not in report and report["base"] is None and report["contamination"] is None

    cut_from_eval = torch.tensor(tokenizer(EVAL_TEXT)["input_ids"][:400]).reshape(2, 200)
    save_windows(folder / "lowbit_calibration.json", cut_from_eval)
    assert evaluate(folder, None, str(eval_text_file), options)["contamination"]["contaminated"] is True

    unrelated = torch.tensor(tokenizer(UNRELATED_TEXT)["input_ids"][:200]).reshape(1, 200)
    save_windows(folder / "lowbit_calibration.json", unrelated)
    contamination = evaluate(folder, None, str(eval_text_file), options)["contamination"]
    assert contamination["contaminated"] is False and contamination["calibration_ngrams"] > 0


def test_base_with_another_vocabulary_is_refused(models, eval_text_file, tmp_path):
    config = tiny_config(False)
    config.vocab_size = 300
    other = save_model(LlamaForCausalLM(config), tmp_path / "other")
    with pytest.raises(UsageError, match="vocabulary"):
        evaluate(models["untied"], other, str(eval_text_file), CPU)


def test_default_base_needs_a_manifest_naming_the_source(tmp_path):
    with pytest.raises(UsageError, match="lowbit_manifest.json"):
        default_base(tmp_path)
    (tmp_path / "lowbit_manifest.json").write_text(json.dumps({"format": "lowbit-manifest", "source": {}}))
    with pytest.raises(UsageError, match="no source model"):
        default_base(tmp_path)
    (tmp_path / "lowbit_manifest.json").write_text(json.dumps({"format": "lowbit-manifest", "source": {"model": "org/base"}}))
    assert default_base(tmp_path) == "org/base"
