"""Run in the loader venv (tests/test_loaders.py): load checkpoints the way users do, write their logits.

    python loader_child.py IDS_JSON OUT_JSON FOLDER [FOLDER ...]
OUT_JSON gets {FOLDER: {"logits": [[...]], "kernels": {class name: count}, "missing_keys": [...],
"unexpected_keys": [...]}}. Imports nothing from lowbit:
this is transformers.AutoModelForCausalLM.from_pretrained with gptqmodel installed, nothing else.
"""

import json
import sys
from collections import Counter

import torch
from transformers import AutoModelForCausalLM


def logits_of(folder: str, ids: torch.Tensor) -> dict:
    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16,
                                                       output_loading_info=True)
    model.eval()
    kernels = Counter(type(m).__name__ for m in model.modules() if hasattr(m, "qweight"))
    with torch.no_grad():
        logits = model(ids).logits.float()
    keys = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
    return {"logits": logits.tolist(), "kernels": dict(kernels), **keys}


def main(ids_json: str, out_json: str, *folders: str) -> None:
    with open(ids_json) as f:
        ids = torch.tensor(json.load(f), dtype=torch.long)
    results = {folder: logits_of(folder, ids) for folder in folders}
    with open(out_json, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
