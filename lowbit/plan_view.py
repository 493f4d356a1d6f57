"""The text `lowbit plan` prints, from the dict that lowbit.quantize.fit.plan returns."""

from __future__ import annotations

from lowbit.quantize.fit import gib
from lowbit.quantize.plan import ALLOCATOR_SLACK, CUDA_CONTEXT


def render(result: dict) -> list[str]:
    """The human-readable plan, line by line."""
    m, s = result["model"], result["settings"]
    device = "the CPU (float32)" if s["device"] == "cpu" else f"a GPU ({8 * s['compute_bytes']}-bit compute)"
    lines = [f"{m['architecture']}: {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']}, "
             f"vocab {m['vocab']}, {m['parameters'] / 1e9:.2f}B parameters",
             (f"{s['method']} {s['bits']}-bit, group {s['group_size']}" if s["method"] in ("gptq", "rtn") else s["method"])
             + (f", calibration {s['nsamples']} x {s['seqlen']}{' (offloaded)' if s['offload'] else ''}"
                if s["calibrated"] else ", no calibration")
             + f"; eval {s['eval_windows']} x {s['eval_seqlen']}, "
             + f"chunk {s['eval_chunk']}; on {device}"
             + (f", each of {s['ranks']} ranks" if s.get("ranks", 1) > 1 else ""),
             f"{'':10}{'GPU peak':>12}{'GPU needed':>13}{'host peak':>12}  fits"]
    on_gpu = s["device"] != "cpu"
    for name in ("quantize", "evaluate"):
        r = result[name]
        gpu_peak, gpu_needed = (r["gpu_peak_bytes"], r["gpu_needed_bytes"]) if on_gpu else (None, None)
        lines.append(f"{name:10}{gib(gpu_peak):>12}{gib(gpu_needed):>13}"
                     f"{gib(r['host_peak_bytes']):>12}  {'yes' if r['fits'] else 'NO'}")
    for name in ("quantize", "evaluate"):
        r = result[name]
        where = ("gpu", "host") if s["device"] != "cpu" else ("host",)
        for memory in where:
            parts = sorted(r[f"{memory}_parts"].items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"  {name} {memory} peak at '{r[f'{memory}_phase']}': "
                         + ", ".join(f"{k} {gib(v)}" for k, v in parts))
    limits = result["limits"]
    lines.append(f"output {result['output_bytes'] / 1e9:.2f} GB, {result['bits_per_weight']:.2f} bits per weight")
    lines.append(f"limits: GPU {gib(limits['gpu_bytes'])} (needed = peak + {ALLOCATOR_SLACK:.0%} allocator slack + "
                 f"{gib(CUDA_CONTEXT)} CUDA context), host {gib(limits['host_bytes'])}")
    lines.append("fits" if result["fits"] else "does NOT fit")
    for tip in result["suggestions"]:
        if tip["option"] is None:
            lines.append(f"  {tip['for']}: {tip['cost']}")
            continue
        gpu = f"GPU needed {gib(tip['gpu_needed_bytes'])}, " if s["device"] != "cpu" else ""
        lines.append(f"  {tip['for']}: {tip['option']} -> {gpu}host {gib(tip['host_peak_bytes'])}; cost: {tip['cost']}")
    return lines
