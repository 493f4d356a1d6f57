"""lowbit's GPTQ checkpoints through the loader users run: transformers + gptqmodel, in a venv of their own.

The venv (scripts/loader-venv.sh: torch 2.13.0 CPU, gptqmodel 7.6.0, transformers 5.24.0, optimum) is built
once per machine under the test cache, like the model fixtures. One subprocess loads every variant with
`AutoModelForCausalLM.from_pretrained` and returns its logits; each must equal lowbit's own loader
(quantize.loader, dense float32) within the float16 the loader computes in.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest
import torch

from lowbit.calibration.windows import CalibrationConfig
from lowbit.quantize.arch import architecture_of
from lowbit.quantize.checkpoint import load_config_dict
from lowbit.quantize.driver import quantize_model
from lowbit.quantize.loader import load_dequantized_model
from lowbit.quantize.settings import QuantizeSettings
from tests.conftest import CACHE, REPO, save_tiny_gemma3_multimodal, save_tiny_model

pytestmark = pytest.mark.loaders

VENV = CACHE / "gptqmodel-7.6.0-venv"
IDS = [[1, 5, 9, 200, 3, 77, 12, 40, 101, 250, 6, 66, 130, 17, 88, 2]]
# (name, architecture, settings): every layout a loader must read
VARIANTS = [
    ("llama-4bit-sym-g32", "llama", dict(bits=4, group_size=32)),
    ("llama-3bit-g32", "llama", dict(bits=3, group_size=32)),  # the default below 4 bits: asymmetric
    ("llama-3bit-sym-g32", "llama", dict(bits=3, group_size=32, sym=True)),
    ("llama-4bit-act-order", "llama", dict(bits=4, group_size=32, act_order=True)),
    ("llama-4bit-asym", "llama", dict(bits=4, group_size=32, sym=False)),
    ("phi3-4bit-fused", "phi3", dict(bits=4, group_size=32)),
    ("qwen2-4bit-biases", "qwen2", dict(bits=4, group_size=32)),
    ("gemma3-4bit", "gemma3", dict(bits=4, group_size=32)),
    ("gemma3-multimodal-4bit", "gemma3-multimodal", dict(bits=4, group_size=32)),  # vision tower copied as it is
]
# Largest |logit difference| allowed, as a fraction of the largest |logit|. gptqmodel picks TorchAtenLinear for
# 4 bits, which computes in bfloat16 (8 significant bits: measured 0.6-0.9 %), and TorchLinear for 3 bits, in
# float16 (measured 0.1 %). A wrong code, scale, zero or group is an error of order one.
MAX_RELATIVE_DIFF = {"TorchAtenLinear": 0.02, "TorchLinear": 0.005}


@pytest.fixture(scope="session")
def loader_python():
    build = subprocess.run(["bash", str(REPO / "scripts" / "loader-venv.sh"), str(VENV), "gptqmodel"], capture_output=True,
                           text=True)
    if build.returncode != 0:
        pytest.fail(f"building the loader venv failed: {build.stderr.strip().splitlines()[-1:]}")
    return VENV / "bin" / "python"


@pytest.fixture(scope="module")
def loaded(loader_python, tmp_path_factory):
    """{variant: (checkpoint folder, what the loader computed)}, one subprocess for all variants."""
    work = tmp_path_factory.mktemp("loaders")
    folders = {}
    for name, arch, settings in VARIANTS:
        if arch == "gemma3-multimodal":
            source = save_tiny_gemma3_multimodal(work / f"{name}-source", dtype=torch.float16)
        else:
            source = save_tiny_model(work / f"{name}-source", arch, layers=2, dtype=torch.float16)
        folders[name] = work / name
        quantize_model(str(source), folders[name], QuantizeSettings(method="gptq", **settings),
                       CalibrationConfig(source="pydoc", nsamples=4, seqlen=64))
    (work / "ids.json").write_text(json.dumps(IDS))
    child = subprocess.run([str(loader_python), str(REPO / "tests" / "loader_child.py"), str(work / "ids.json"),
                            str(work / "out.json"), *map(str, folders.values())], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads((work / "out.json").read_text())
    return {name: (folder, results[str(folder)]) for name, folder in folders.items()}


@pytest.mark.parametrize("variant", [name for name, _, _ in VARIANTS])
def test_transformers_with_gptqmodel_gives_lowbits_logits(loaded, variant):
    folder, result = loaded[variant]
    arch = architecture_of(load_config_dict(folder))
    assert sum(result["kernels"].values()) == len(arch.quantized_linears())  # every decoder Linear, nothing else
    assert result["missing_keys"] == [] and result["unexpected_keys"] == []
    ours = load_dequantized_model(folder, dtype=torch.float32)(torch.tensor(IDS)).logits.detach()
    theirs = torch.tensor(result["logits"])
    (kernel,) = result["kernels"]  # one kernel for all the model's Linears
    relative = ((ours - theirs).abs().max() / ours.abs().max()).item()
    print(f"{variant}: {kernel}, max |logit difference| / max |logit| = {relative:.2e}")
    assert relative < MAX_RELATIVE_DIFF[kernel]  # (argmax may differ: a random model has near-ties)


def test_gptqmodel_loads_a_mixed_checkpoint_with_lowbits_logits(loader_python, tmp_path):
    """A size budget's checkpoint with every format it can choose (4-bit g64 base, 4-bit g32, 8-bit, 16-bit),
    one per projection group in turn, written from one solve's kept candidates (assemble.write_checkpoint)
    and read back through the `dynamic` map by GPTQModel.load (loader_child.gptqmodel_logits_of: why not
    from_pretrained)."""
    from lowbit.quantize.assemble import write_checkpoint
    from lowbit.quantize.driver import open_job, solve_layers
    from lowbit.quantize.pack import UNQUANTIZED, LinearFormat

    source = save_tiny_model(tmp_path / "source", "llama", layers=2, dtype=torch.float16)
    job = open_job(str(source), tmp_path / "solved", QuantizeSettings(method="gptq", bits=4, group_size=64, target_bpw=8),
                   CalibrationConfig(source="pydoc", nsamples=4, seqlen=64))
    solve_layers(job)
    cycle = [LinearFormat(4, 64), LinearFormat(4, 32), LinearFormat(8, 64), UNQUANTIZED]
    units = [(i, group) for i in range(job.arch.num_layers) for group in job.arch.groups]
    formats = {job.arch.layer_prefix(i) + name: cycle[n % len(cycle)] for n, (i, group) in enumerate(units)
               for name in group}
    folder = tmp_path / "mixed"
    write_checkpoint(job, formats, folder)
    (tmp_path / "ids.json").write_text(json.dumps(IDS))
    child = subprocess.run([str(loader_python), str(REPO / "tests" / "loader_child.py"), str(tmp_path / "ids.json"),
                            str(tmp_path / "out.json"), f"gptqmodel:{folder}"], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())[f"gptqmodel:{folder}"]
    bits_loaded = Counter(int(kernel.rsplit(":", 1)[1]) for kernel, n in result["kernels"].items() for _ in range(n))
    assert bits_loaded == Counter(f.bits for f in formats.values() if f.quantized)  # each module in its own format
    assert set(result["dense_linears"]) == {m for m, f in formats.items() if not f.quantized}
    ours = load_dequantized_model(folder, dtype=torch.float32)(torch.tensor(IDS)).logits.detach()
    relative = ((ours - torch.tensor(result["logits"])).abs().max() / ours.abs().max()).item()
    print(f"mixed {dict(bits_loaded)} + {len(result['dense_linears'])} dense: max |logit difference| / max |logit| "
          f"= {relative:.2e}")
    assert relative < max(MAX_RELATIVE_DIFF.values())
