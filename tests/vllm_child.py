"""Run in the vLLM venv (tests/test_vllm.py): serve a checkpoint the way users do, write the next token's top 5.

    python vllm_child.py IDS_JSON OUT_JSON FOLDER
OUT_JSON gets {"quantization": vLLM's method, "top": {token id: log-probability}}. Imports nothing from lowbit.
"""

import json
import sys

from vllm import LLM, SamplingParams


def main(ids_json: str, out_json: str, folder: str) -> None:
    with open(ids_json) as f:
        ids = json.load(f)
    # on the CPU backend gpu_memory_utilization is the share of host memory reserved for it
    llm = LLM(model=folder, dtype="float16", enforce_eager=True, max_model_len=128, max_num_seqs=1,
              gpu_memory_utilization=0.1)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    top = {str(token): entry.logprob for token, entry in out[0].outputs[0].logprobs[0].items()}
    method = llm.llm_engine.vllm_config.model_config.quantization
    with open(out_json, "w") as f:
        json.dump({"quantization": method, "top": top}, f)


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    main(*sys.argv[1:])
