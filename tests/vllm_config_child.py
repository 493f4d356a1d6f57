"""Run in the vLLM venv (tests/test_vllm.py): does vLLM accept each GPTQ quantization_config?

    python vllm_config_child.py IN_JSON OUT_JSON
IN_JSON: [{"config": quantization_config, "modules": [full module names]}]. OUT_JSON: {"gptq": for each, null
when vLLM accepts it, else its error; "bitsandbytes": whether vLLM has a bitsandbytes method}. vLLM's own checks,
as its loader runs them: the config is parsed, then each module that a "dynamic" key matches gets its
overridden config. Imports nothing from lowbit; needs no kernel.
"""

import copy
import json
import sys

from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
from vllm.model_executor.layers.quantization.utils.gptq_utils import get_dynamic_override, override_config


def refusal(config: dict, modules: list[str]) -> str | None:
    try:
        parsed = AutoGPTQConfig.from_config(config)
        for module in modules:
            if isinstance(get_dynamic_override(parsed, module), dict):
                override_config(copy.deepcopy(parsed), module)
    except ValueError as e:
        return str(e)
    return None


def main(in_json: str, out_json: str) -> None:
    with open(in_json) as f:
        cases = json.load(f)
    with open(out_json, "w") as f:
        json.dump({"gptq": [refusal(case["config"], case["modules"]) for case in cases],
                   "bitsandbytes": "bitsandbytes" in QUANTIZATION_METHODS}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
