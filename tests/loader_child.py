"""Run in the loader venv (tests/test_loaders.py): load checkpoints the way users do, write their logits.

    python loader_child.py IDS_JSON OUT_JSON FOLDER [FOLDER ...]      (gptqmodel:FOLDER: GPTQModel.load)
OUT_JSON gets {FOLDER: {"logits": [[...]], "kernels": {class name: count}, "missing_keys": [...],
"unexpected_keys": [...]}}. Imports nothing from lowbit:
this is transformers.AutoModelForCausalLM.from_pretrained with gptqmodel installed, nothing else.
"""

import json
import sys
from collections import Counter

import torch
from transformers import AutoModelForCausalLM

GPTQMODEL = "gptqmodel:"  # a folder so prefixed is loaded with GPTQModel.load instead


def logits_of(folder: str, ids: torch.Tensor) -> dict:
    if folder.startswith(GPTQMODEL):
        return gptqmodel_logits_of(folder[len(GPTQMODEL):], ids)
    model, info = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16,
                                                       output_loading_info=True)
    model.eval()
    kernels = Counter(type(m).__name__ for m in model.modules() if hasattr(m, "qweight"))
    with torch.no_grad():
        logits = model(ids).logits.float()
    keys = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
    return {"logits": logits.tolist(), "kernels": dict(kernels), **keys}


def gptqmodel_logits_of(folder: str, ids: torch.Tensor) -> dict:
    """GPTQModel.load: the loader that reads quantization_config.dynamic (per-module bits, modules left in 16
    bits). transformers 5.24's from_pretrained drops `dynamic` from the config it hands gptqmodel and then
    refuses the checkpoint's mixed shapes, so a mixed checkpoint is loaded the way gptqmodel documents."""
    from gptqmodel import GPTQModel

    model = GPTQModel.load(folder, device="cpu", dtype=torch.float16).model
    model.eval()
    kernels = Counter(f"{type(m).__name__}:{m.bits}" for m in model.modules() if hasattr(m, "qweight"))
    dense = sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name)
    with torch.no_grad():
        logits = model(ids).logits.float()
    return {"logits": logits.tolist(), "kernels": dict(kernels), "dense_linears": dense,
            "missing_keys": [], "unexpected_keys": []}


def main(ids_json: str, out_json: str, *folders: str) -> None:
    with open(ids_json) as f:
        ids = torch.tensor(json.load(f), dtype=torch.long)
    results = {folder: logits_of(folder, ids) for folder in folders}
    with open(out_json, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
