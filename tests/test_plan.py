"""`lowbit plan`: the memory model, its CLI, the driver's offload decision, and a check against the engine."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.quantize.arch import model_shape
from lowbit.quantize.fit import plan, should_offload
from lowbit.quantize.settings import QuantizeSettings
from lowbit.quantize.plan import (
    GiB,
    PlanSettings,
    eval_phases,
    peaks,
    quantize_phases,
)

PHI4 = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 5120, "intermediate_size": 17920,
    "num_attention_heads": 40, "num_key_value_heads": 10, "num_hidden_layers": 40, "vocab_size": 100352,
    "max_position_embeddings": 16384, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 256,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_plan(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def quantize_gpu_peak(config: dict, settings: PlanSettings) -> int:
    return peaks(quantize_phases(model_shape(config), settings), settings)[0].bytes


# ---- the CLI ----

def test_tiny_model_fits_a_small_gpu_and_json_parses(tmp_path):
    folder = write_config(tmp_path / "tiny", TINY)
    result = run_plan(str(folder), "--gpu", "2GiB", "--host-memory", "8GiB", "--group-size", "32",
                      "--nsamples", "8", "--seqlen", "64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["fits"] and data["suggestions"] == []
    assert 0 < data["quantize"]["gpu_peak_bytes"] < data["quantize"]["gpu_needed_bytes"] <= 2 * GiB
    assert data["bits_per_weight"] > 4  # codes plus scales, zeros and g_idx
    assert data["model"]["layers"] == 3


def test_phi4_fits_16gib_and_the_solver_of_down_proj_is_the_peak(tmp_path):
    folder = write_config(tmp_path / "phi4", PHI4)
    result = run_plan(str(folder), "--gpu", "16GiB", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    quantize = data["quantize"]
    assert quantize["gpu_needed_bytes"] <= 16 * GiB
    assert quantize["gpu_phase"] == "solve mlp.down_proj"  # K = 17920: its K x K float32 matrices dominate
    assert 14e9 < data["model"]["parameters"] < 15.5e9
    text = run_plan(str(folder), "--gpu", "16GiB")
    assert text.exit_code == 0 and "fits" in text.stdout and "solve mlp.down_proj" in text.stdout


def test_a_model_that_does_not_fit_exits_1_with_suggestions_that_do_fit(tmp_path):
    folder = write_config(tmp_path / "phi4", PHI4)
    result = run_plan(str(folder), "--gpu", "6GiB", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert not data["fits"] and not data["quantize"]["fits_gpu"]
    options = [tip["option"] for tip in data["suggestions"]]
    assert "--offload" in options
    assert all(tip["gpu_needed_bytes"] is None or tip["gpu_needed_bytes"] <= 6 * GiB for tip in data["suggestions"])
    # taking the first suggestion makes it fit
    assert run_plan(str(folder), "--gpu", "6GiB", "--offload").exit_code == 0
    text = run_plan(str(folder), "--gpu", "6GiB")
    assert text.exit_code == 1 and "--offload" in text.stdout and "does not fit" in text.output


def test_where_fp_targets_take_the_host_past_its_memory_the_first_suggestion_drops_them(tmp_path):
    folder = write_config(tmp_path / "phi4", PHI4)
    args = [str(folder), "--gpu", "16GiB", "--method", "nf4", "--calibrated", "--host-memory", "12GiB"]
    data = json.loads(run_plan(*args, "--json").stdout)
    assert not data["quantize"]["fits_host"] and data["quantize"]["fits_gpu"]
    assert "unquantized inputs kept" in data["quantize"]["host_parts"]
    first = data["suggestions"][0]
    assert first["option"] == "--no-fp-targets" and first["host_peak_bytes"] <= 12 * GiB
    assert run_plan(*args, "--no-fp-targets").exit_code == 0


def test_the_unquantized_inputs_stay_on_the_host_from_layer_to_layer():
    """FullPrecisionStream writes each layer's kept inputs over the last layer's: from the first unquantized pass
    on, every phase of the layer loop holds them, the layer's save included."""
    settings = PlanSettings(quantize=QuantizeSettings(bits=3), nsamples=128, seqlen=2048)
    phases = quantize_phases(model_shape(PHI4), settings)
    first = next(i for i, phase in enumerate(phases) if phase.name == "run the layer unquantized")
    loop = [phase for phase in phases[first:] if not phase.name.startswith("write")]
    assert loop[-1].name.startswith("save the layer")
    assert all(phase.host.get("unquantized inputs kept", 0) > 0 for phase in loop)


def test_when_nothing_fits_the_plan_says_what_is_too_large(tmp_path):
    folder = write_config(tmp_path / "phi4", PHI4)
    data = json.loads(run_plan(str(folder), "--gpu", "4GiB", "--host-memory", "2GiB", "--json").stdout)
    assert not data["fits"]
    assert any(tip["option"] is None and "solve mlp.down_proj" in tip["cost"] and "alone is" in tip["cost"]
               for tip in data["suggestions"])


def test_bad_inputs_are_usage_errors(tmp_path):
    assert run_plan(str(tmp_path / "absent")).exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_plan(str(empty)).exit_code == 2  # no config.json
    folder = write_config(tmp_path / "phi4", PHI4)
    assert run_plan(str(folder), "--gpu", "lots").exit_code == 2
    assert run_plan(str(folder), "--method", "awq").exit_code == 2
    assert run_plan(str(folder), "--group-size", "96").exit_code == 2  # does not divide 5120
    unsupported = write_config(tmp_path / "gpt2", {**TINY, "architectures": ["GPT2LMHeadModel"]})
    assert run_plan(str(unsupported)).exit_code == 2


# ---- the model's behaviour ----

def test_predictions_move_the_way_the_settings_do():
    base = PlanSettings(nsamples=64, seqlen=1024)
    gpu = quantize_gpu_peak(PHI4, base)
    assert quantize_gpu_peak(PHI4, replace(base, nsamples=128)) > gpu
    assert quantize_gpu_peak(PHI4, replace(base, seqlen=2048)) > gpu
    assert quantize_gpu_peak(PHI4, replace(base, offload=True)) < gpu
    shape = model_shape(PHI4)
    host = peaks(quantize_phases(shape, base), base)[1].bytes
    offloaded = replace(base, offload=True)
    assert peaks(quantize_phases(shape, offloaded), offloaded)[1].bytes >= host  # the activations moved there
    wider = replace(base, quantize=QuantizeSettings(true_sequential=False))  # every group's Hessian at once
    assert quantize_gpu_peak(PHI4, wider) >= gpu
    eval_gpu = peaks(eval_phases(shape, base), base)[0].bytes
    assert peaks(eval_phases(shape, replace(base, eval_chunk=128)), base)[0].bytes < eval_gpu
    assert peaks(eval_phases(shape, replace(base, eval_windows=80)), base)[0].bytes > eval_gpu
    deeper = {**PHI4, "num_hidden_layers": 80}  # the engine holds one layer: depth changes nothing
    assert quantize_gpu_peak(deeper, base) == gpu


def test_q_k_v_and_gate_up_solved_as_one_are_one_solve_in_the_plan_with_no_copy_of_their_hessian():
    def solves(**settings):
        plan_settings = PlanSettings(QuantizeSettings(group_size=32, **settings), device="cpu", nsamples=8, seqlen=64)
        return {p.name: p for p in quantize_phases(model_shape(TINY), plan_settings) if p.name.startswith("solve ")}

    together = solves()
    qkv = together["solve self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"]
    assert "copy of the group's Hessian" not in qkv.device
    assert qkv.device["solver temporaries of self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"] > 0
    gate_up = together["solve mlp.gate_proj+mlp.up_proj"]  # within down_proj's rows and Hessian: one solve too
    assert "copy of the group's Hessian" not in gate_up.device
    assert "solve self_attn.q_proj" in solves(target_bpw=5.0)  # a budget chooses Linear by Linear


def test_rtn_needs_no_gpu_and_output_size_follows_bits():
    rtn = PlanSettings(QuantizeSettings(method="rtn"), calibrated=False)
    assert quantize_gpu_peak(PHI4, rtn) == 0
    four = plan(PHI4, PlanSettings())
    eight = plan(PHI4, PlanSettings(QuantizeSettings(bits=8)))
    assert eight["output_bytes"] > four["output_bytes"]
    assert eight["bits_per_weight"] - four["bits_per_weight"] == pytest.approx(4, abs=0.1)


def test_quantize_offloads_exactly_when_the_plan_says_it_would_not_fit(monkeypatch):
    settings = PlanSettings(nsamples=32, seqlen=512)
    predicted = quantize_gpu_peak(PHI4, settings)
    cuda = torch.device("cuda")
    for free, expected in ((int(predicted * 1.3), False), (int(predicted * 0.9), True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        assert should_offload(PHI4, settings, cuda, "quantize") is expected
    assert should_offload(PHI4, settings, torch.device("cpu"), "quantize") is False


def test_evaluator_offloads_exactly_when_the_plan_says_it_would_not_fit(monkeypatch):
    from lowbit.evals import evaluate

    windows = torch.zeros(40, 2048, dtype=torch.int64)
    settings = PlanSettings(eval_windows=40, eval_seqlen=2048, eval_chunk=512)
    predicted, _ = peaks(eval_phases(model_shape(PHI4), settings), settings)
    cuda = torch.device("cuda")
    for free, expected in ((int(predicted.bytes * 1.3), False), (int(predicted.bytes * 0.9), True)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        assert evaluate.should_offload(PHI4, windows, 512, torch.bfloat16, cuda, with_base=True) is expected
    assert evaluate.should_offload(PHI4, windows, 512, torch.float32, torch.device("cpu"), with_base=True) is False


# ---- against the engine ----

def test_chunked_packing_equals_packing_at_once(monkeypatch):
    from lowbit.quantize import pack, plan_solver as memory_model

    assert memory_model.PACK_CHUNK_VALUES == pack.CHUNK_VALUES  # the plan counts the temporaries of one chunk
    codes = torch.randint(0, 8, (64, 37), dtype=torch.int32)
    whole = pack.pack_rows(codes, 3)
    monkeypatch.setattr(pack, "CHUNK_VALUES", 64 * 5)  # 5 columns a chunk, the last one partial
    assert torch.equal(pack.pack_rows(codes, 3), whole)
    assert torch.equal(pack.unpack_rows(whole, 3, rows=64), codes)


def _peak_allocated_bytes(run) -> int | None:
    """Peak of live bytes in torch's CPU allocator while run() runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    try:
        events = profiler.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:  # the profiler's event API changed
        return None
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


# what the engine reads through Python buffers, outside torch's allocator, and the process itself
NOT_TORCH_ALLOCATED = ("decoder layer as read", "next decoder layer as read", "embedding as read", "weight as read",
                       "largest tensor being written", "process (Python, torch, transformers)")


@pytest.mark.parametrize("arch, method, intermediate, act_order, target_bpw, fp_targets", [
    ("llama", "gptq", 768, False, None, False), ("phi3", "gptq", 768, False, None, False),
    ("llama", "rtn", 768, False, None, False),
    # K = 2048 for down_proj: its K x K Hessian is 17 MB of a 48 MB peak, so a second K x K buffer (the solver
    # before the in-place factorisation held three) fails the 0.8 bound. (K = 4096 passes too, but the
    # profiler's events of that run cost 100 s and 7 GB of host memory.)
    ("llama", "gptq", 2048, True, None, False), ("phi3", "nf4", 2048, False, None, False),
    # a size budget: three formats swept at once, and the candidates' tensors kept until the layer is saved
    ("llama", "gptq", 2048, True, 6.0, False),
    # the unquantized hidden states and inputs kept, the cross sums beside the Hessians (fp_targets.py)
    ("llama", "gptq", 2048, True, None, True),
])
def test_prediction_matches_the_engines_allocated_peak(tmp_path, arch, method, intermediate, act_order, target_bpw,
                                                       fp_targets):
    """Quantize a small bf16 model on the CPU under the profiler: the predicted peak of torch-allocated
    bytes must be within 0.8-1.25 of the measured one (deterministic: allocation sizes, not RSS)."""
    from transformers import AutoModelForCausalLM

    from lowbit.calibration.windows import CalibrationConfig
    from lowbit.quantize.driver import QuantizeSettings, RunOptions, quantize_model
    from tests.conftest import byte_tokenizer, tiny_config

    config = tiny_config(arch, layers=2, hidden=256)
    config.intermediate_size = intermediate
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    del model
    settings = QuantizeSettings(method=method, group_size=64, act_order=act_order, target_bpw=target_bpw,
                                fp_targets=fp_targets)
    calibration = CalibrationConfig(source="pydoc", nsamples=8, seqlen=256) if method != "rtn" else None
    measured = _peak_allocated_bytes(lambda: quantize_model(str(tmp_path / "model"), tmp_path / "out", settings,
                                                            calibration, RunOptions(device="cpu")))
    if measured is None:
        pytest.skip("this torch's profiler does not expose memory events")

    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    plan_settings = PlanSettings(settings, device="cpu", nsamples=8, seqlen=256, calibrated=method != "rtn")
    phases = quantize_phases(model_shape(saved), plan_settings)
    predicted = max(sum(v for k, v in {**p.device, **p.host}.items() if k not in NOT_TORCH_ALLOCATED) for p in phases)
    assert 0.8 <= predicted / measured <= 1.25, (predicted, measured)

    manifest = json.loads((tmp_path / "out" / "lowbit_manifest.json").read_text())
    if target_bpw is None:
        assert plan(saved, plan_settings)["bits_per_weight"] == pytest.approx(manifest["bits_per_weight"], abs=1e-3)
    else:  # the budget's size: what the choice may spend, and spent up to a step
        assert manifest["bits_per_weight"] <= plan(saved, plan_settings)["bits_per_weight"] <= target_bpw
        assert manifest["bits_per_weight"] > target_bpw - 0.5


def test_eval_prediction_matches_the_evaluators_allocated_peak(tmp_path, shared_data):
    """The same check for `lowbit eval` (base vs an RTN checkpoint of it), on wikitext-2 windows."""
    from transformers import AutoModelForCausalLM

    from lowbit.evals.evaluate import EvalOptions, evaluate
    from lowbit.quantize.driver import QuantizeSettings, RunOptions, quantize_model
    from tests.conftest import byte_tokenizer, tiny_config

    config = tiny_config("llama", layers=2, hidden=256)
    config.intermediate_size = 768
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    quantize_model(str(tmp_path / "model"), tmp_path / "out", QuantizeSettings(method="rtn", group_size=64), None,
                   RunOptions(device="cpu"))
    text = tmp_path / "eval.txt"
    text.write_text((shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text()[:100_000])
    options = EvalOptions(seqlen=256, max_windows=8, device="cpu", chunk_tokens=128)
    measured = _peak_allocated_bytes(lambda: evaluate(tmp_path / "out", tmp_path / "model", str(text), options))
    if measured is None:
        pytest.skip("this torch's profiler does not expose memory events")

    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    settings = PlanSettings(QuantizeSettings(method="rtn", group_size=64), calibrated=False, device="cpu",
                            eval_windows=8, eval_seqlen=256, eval_chunk=128)
    not_allocated = (*NOT_TORCH_ALLOCATED, "layer as read", "lm_head as read (both models)")
    predicted = max(sum(v for k, v in {**p.device, **p.host}.items() if k not in not_allocated)
                    for p in eval_phases(model_shape(saved), settings))
    assert 0.8 <= predicted / measured <= 1.25, (predicted, measured)


def test_the_engine_holds_no_more_as_it_goes_deeper(tmp_path):
    """Depth independence, deterministically: the peak of torch-allocated bytes quantizing 4 layers is
    that of 2 layers (what the plan assumes: one layer resident at a time)."""
    from transformers import AutoModelForCausalLM

    from lowbit.calibration.windows import CalibrationConfig
    from lowbit.quantize.driver import QuantizeSettings, RunOptions, quantize_model
    from tests.conftest import byte_tokenizer, tiny_config

    measured = {}
    for layers in (2, 4):
        config = tiny_config("phi3", layers=layers, hidden=256)
        config.intermediate_size = 768
        torch.manual_seed(0)
        folder = tmp_path / f"model-{layers}"
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        measured[layers] = _peak_allocated_bytes(lambda: quantize_model(
            str(folder), tmp_path / f"out-{layers}", QuantizeSettings(group_size=64),
            CalibrationConfig(source="pydoc", nsamples=8, seqlen=256), RunOptions(device="cpu")))
    if measured[2] is None:
        pytest.skip("this torch's profiler does not expose memory events")
    assert measured[4] <= 1.05 * measured[2], measured


FREED_HEAP_SCRIPT = """
import ctypes
import torch
from lowbit.quantize.stream import release_free_heap

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: 2 MB blocks go on the heap, as after glibc raises it itself
libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: free() alone does not shrink the heap
start = rss_mib()
chunks = [torch.ones(2**19) for _ in range(128)]  # 256 MB in 2 MB tensors, like a layer's small ones
sentinel = torch.ones(1000)  # above them on the heap: glibc cannot shrink the top
del chunks
before = rss_mib()
release_free_heap()
print(before - start, before - rss_mib())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux")
def test_freed_heap_goes_back_to_the_system_after_every_layer(tmp_path, monkeypatch):
    """The host-memory creep of a few tens of MB a layer (glibc keeping freed small blocks) is trimmed."""
    import subprocess
    import sys

    from lowbit.quantize import driver, stream

    if stream._LIBC is None:
        pytest.skip("not glibc")
    result = subprocess.run([sys.executable, "-c", FREED_HEAP_SCRIPT], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, check=True)
    kept, released = map(float, result.stdout.split())  # MiB still resident after the free, MiB trimmed
    if kept < 128:
        pytest.skip(f"this allocator gave the 256 MB back by itself ({kept:.0f} MiB kept)")
    assert released > 0.8 * kept, result

    from tests.conftest import save_tiny_model

    from lowbit.calibration.windows import CalibrationConfig

    model = save_tiny_model(tmp_path / "model", layers=3)
    for method, calibration in (("rtn", None), ("gptq", CalibrationConfig(source="pydoc", nsamples=2, seqlen=32))):
        calls = []
        monkeypatch.setattr(driver, "release_free_heap", lambda: calls.append(1))  # weights-only loop
        monkeypatch.setattr(stream, "release_free_heap", lambda: calls.append(1))  # stream.each_layer
        driver.quantize_model(str(model), tmp_path / method, driver.QuantizeSettings(method=method, group_size=32),
                              calibration)
        assert len(calls) == 3, method
