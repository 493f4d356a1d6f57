"""Issue 12's GPU targets, as `lowbit plan` predicts them for the real configs in benchmarks/configs
(GPTQ 4-bit g128, 128 x 2048 calibration). Pure arithmetic: a regression in the engine's memory
(a second K x K matrix, a float32 copy kept too long) shows here once quantize/plan.py follows it."""

import json
from pathlib import Path

import pytest

from lowbit.quantize.fit import plan
from lowbit.quantize.plan import GiB, PlanSettings
from lowbit.quantize.settings import QuantizeSettings

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def quantize_gpu_needed(model: str, offload: bool) -> int:
    config = json.loads((CONFIGS / f"{model}.json").read_text())
    return plan(config, PlanSettings(QuantizeSettings(method="gptq", bits=4, group_size=128), offload=offload))["quantize"]["gpu_needed_bytes"]


@pytest.mark.parametrize("model, offload, limit_gib", [
    ("phi-4", False, 7),  # an 8 GB card without offloading the activations
    ("phi-4", True, 6),
    ("llama-3.1-70b", True, 12),
    ("llama-3.1-405b", True, 32),
])
def test_quantizing_fits_the_issue_s_gpu(model, offload, limit_gib):
    # 405B: its down_proj Hessian (K = 53248) is 10.56 GiB; a second K x K matrix would take it past 32 GiB
    assert quantize_gpu_needed(model, offload) <= limit_gib * GiB

