"""The llm-compressor side of the side-by-side benchmark, and the children both tools' runs are measured in.

    python benchmarks/peer_llmcompressor.py --models gemma3 --configs 4g128   # lowbit GPTQ vs llm-compressor

The command above is `benchmarks/quality.py` restricted to lowbit's GPTQ and llm-compressor's runs; see
that script for the grid, the windows and the cache. This module holds:

- the llm-compressor configurations (PEER_CONFIGS) and the child that runs one of them in llm-compressor's
  own virtual environment (default ~/.cache/lowbit-bench/llmc-venv, made on first use with our torch),
  on token windows given as a file, saving a compressed checkpoint and, next to it, `peer_run.json`: the
  configuration it applied as read back from the `recipe.yaml` it saved and from the checkpoint's
  `quantization_config`, and the seconds `oneshot` took;
- one plain transformers perplexity for every model (base, lowbit's, llm-compressor's), in a child of
  whichever environment can load that model;
- `timed_child`: a child process from interpreter start to exit, with its wall time, CPU time and peak RSS.

llm-compressor 0.14 facts this relies on (read in its source, llmcompressor/modifiers/gptq/base.py):
`GPTQModifier.actorder` defaults to a sentinel that resolves to "static" whenever the scheme leaves
actorder unset, so a scheme's `actorder: null` does not turn it off; passing `actorder=None` to the
modifier does. Group scales always come from the weight observer on the original weights, before the
solver runs (static groups, with or without act-order). Weight observers: "minmax" (default), "mse",
"imatrix_mse" (MSE weighted by each input column's mean squared activation).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
# The environment this script was started in, before anything imports lowbit: lowbit sets an OpenMP default for
# its own processes (lowbit/__init__.py), and a child started from here would inherit it. Every child gets this
# one, so llm-compressor runs as a user would start it, and `lowbit` sets its own default again.
STARTING_ENVIRONMENT = dict(os.environ)
LLMC_VERSION = "0.14.0.1"
DAMP, BLOCK_SIZE = 0.01, 128

class PeerConfig(NamedTuple):
    """One llm-compressor GPTQ configuration."""

    actorder: str | None = "default"  # the modifier-level actorder; "default" leaves it unset (static)
    observer: str | None = None  # the weight observer; None for its default (memoryless_minmax)
    symmetric: bool = True
    fast_matmul: bool = False  # run under torch's "medium" float32 matmul precision, as lowbit's --fast-matmul


PEER_CONFIGS = {
    "llmc-default": PeerConfig(),
    "llmc-noact": PeerConfig(actorder=None),
    "llmc-mse": PeerConfig(observer="mse"),
    "llmc-imatrix": PeerConfig(observer="imatrix_mse"),
    "llmc-fastmm": PeerConfig(fast_matmul=True),
    "llmc-asym": PeerConfig(symmetric=False),
}
# the candidates for llm-compressor's best shipped configuration (all keep its static act-order)
PEER_BEST_CANDIDATES = ("llmc-default", "llmc-mse", "llmc-imatrix")


# ---- children ----

def load_ids(path: Path):
    import torch

    return torch.tensor(json.loads(Path(path).read_text())["windows"], dtype=torch.int64)


def child_llmc(model: str, calibration: str, output: str, config: str, bits: str, group_size: str) -> dict:
    """One llm-compressor GPTQ run (W<bits>A16, groups, as PEER_CONFIGS[config] says) on the given windows; compressed
    save."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    peer = PEER_CONFIGS[config]
    if peer.fast_matmul:
        torch.set_float32_matmul_precision("medium")
    windows = load_ids(Path(calibration))
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    weights = {"num_bits": int(bits), "type": "int", "symmetric": peer.symmetric, "strategy": "group",
               "group_size": int(group_size)}
    if peer.observer:
        weights["observer"] = peer.observer
    options = {} if peer.actorder == "default" else {"actorder": peer.actorder}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          dampening_frac=DAMP, block_size=BLOCK_SIZE, **options)
    started = time.time()
    oneshot(model=loaded, dataset=dataset, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds = time.time() - started
    loaded.save_pretrained(output, save_compressed=True)
    run = {"oneshot_seconds": round(seconds, 1), "applied": applied_config(Path(output))}
    (Path(output) / "peer_run.json").write_text(json.dumps(run, indent=2))
    return run


def applied_config(folder: Path) -> dict:
    """What llm-compressor applied, from the recipe.yaml it saved and the checkpoint's quantization_config."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):  # the recipe writes enums as python/object/apply tags: keep their value
        pass

    RecipeLoader.add_multi_constructor("tag:yaml.org,2002:python/object/apply:",
                                       lambda loader, suffix, node: loader.construct_sequence(node)[0])
    recipe = yaml.load((folder / "recipe.yaml").read_text(), Loader=RecipeLoader)
    modifier = find_key(recipe, "GPTQModifier") or {}
    recipe_weights = find_key(modifier, "weights") or {}
    saved = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    saved_weights = find_key(saved, "weights") or {}
    return {
        "recipe": {"actorder": modifier.get("actorder", "(unset)"), "dampening_frac": modifier.get("dampening_frac"),
                   "block_size": modifier.get("block_size"), "ignore": modifier.get("ignore"),
                   "weights": recipe_weights},
        "checkpoint": {key: saved_weights.get(key) for key in
                       ("num_bits", "group_size", "symmetric", "strategy", "actorder", "observer")},
        "format": saved.get("format"),
    }


def find_key(tree, key: str):
    """The first value stored under `key` anywhere in a nested dict/list (recipes nest by stage)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = find_key(item, key)
            if found is not None:
                return found
    return None


def perplexity(model, windows, top_out: Path | None = None, base_top: Path | None = None) -> dict:
    """exp(mean NLL) over all windows, position t predicting t + 1; optionally the argmax agreement with the base."""
    import torch

    nll, count, tops = 0.0, 0, []
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0)
            out = model(input_ids=ids, labels=ids)
            nll += float(out.loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
            tops.append(out.logits[0, :-1].argmax(-1))
            del out
    result = {"ppl": math.exp(nll / count)}
    top = torch.stack(tops)
    if top_out:
        torch.save(top, top_out)
    if base_top and Path(base_top).exists():
        result["same_top"] = float((top == torch.load(base_top)).float().mean())
    return result


def child_ppl(kind: str, model: str, evaluation: str, top_out: str = "", base_top: str = "") -> dict:
    """Perplexity of a model folder: plain or llm-compressor's (decompressed by transformers), or lowbit's."""
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "lowbit":
        sys.path.insert(0, str(REPO))
        from lowbit.quantize.loader import load_dequantized_model

        loaded = load_dequantized_model(Path(model), dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return perplexity(loaded.eval(), load_ids(Path(evaluation)), Path(top_out) if top_out else None,
                      Path(base_top) if base_top else None)


# ---- the driver's side ----

def ensure_llmc_venv(venv: Path) -> Path:
    """A venv with llm-compressor and the torch we run (pip's constraints and find-links apply)."""
    import torch

    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}",
                    f"llmcompressor=={LLMC_VERSION}"], check=True)
    return python


def llmc_command(python: Path, model: Path, calibration: Path, output: Path, config: str, bits: int, group: int) -> list[str]:
    return [str(python), str(Path(__file__).resolve()), "--child", "llmc", str(model), str(calibration), str(output),
            config, str(bits), str(group)]


def ppl_command(python: Path, kind: str, model: Path, evaluation: Path, top_out: Path | None, base_top: Path | None) -> list[str]:
    return [str(python), str(Path(__file__).resolve()), "--child", "ppl", kind, str(model), str(evaluation),
            str(top_out or ""), str(base_top or "")]


def timed_child(command: list[str], env: dict | None = None) -> dict:
    """Run a child to completion: its wall and CPU seconds, its peak RSS (ru_maxrss), its last JSON stdout line."""
    started = time.time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files, not pipes: a chatty child never blocks
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, env=env or STARTING_ENVIRONMENT)
        _, status, usage = os.wait4(child.pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    result = {"seconds": round(time.time() - started, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
              "peak_rss_bytes": usage.ru_maxrss * 1024}
    if os.waitstatus_to_exitcode(status) != 0:
        lines = [line for line in (stderr + stdout).strip().splitlines() if line.strip()]
        raise ChildFailed(lines[-1][:300] if lines else f"exit {os.waitstatus_to_exitcode(status)}", stderr[-4000:])
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return {**result, **(json.loads(lines[-1]) if lines else {})}


class ChildFailed(Exception):
    def __init__(self, line: str, log: str):
        super().__init__(line)
        self.log = log


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        print(json.dumps(child_llmc(*rest) if kind == "llmc" else child_ppl(*rest)))
        return
    sys.path.insert(0, str(REPO))
    from benchmarks import quality

    quality.main(["--methods", "gptq-default,gptq,gptq-ss-ao," + ",".join(PEER_CONFIGS), "--no-write", *sys.argv[1:]])


if __name__ == "__main__":
    main()
