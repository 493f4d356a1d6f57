"""Does a run fit the memory it has? The verdict behind `lowbit plan`, what to change when it does not,
and the engine's automatic offload decisions, all from the memory model in quantize/plan.py.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from lowbit.errors import UsageError
from lowbit.quantize.arch import ModelShape, model_shape
from lowbit.quantize.mixed import budget_bytes
from lowbit.quantize.settings import GPTQ_FORMAT_METHODS
from lowbit.quantize.plan_ranks import rank_eval_phases, rank_quantize_phases
from lowbit.quantize.plan import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT,
    GiB,
    Peak,
    PlanSettings,
    eval_phases,
    linear_output_bytes,
    peaks,
    quantize_phases,
)


def output_size(shape: ModelShape, s: PlanSettings) -> tuple[int, float]:
    """(bytes of the output's weights, bits per quantized weight) as the manifest counts them (a budget's: at most)."""
    quantized = shape.layers * sum(linear_output_bytes(linear, s) for linear in shape.linears)
    weights = shape.layers * sum(linear.weights for linear in shape.linears)
    quantized = max(quantized, budget_bytes(s.quantize.target_bpw or 0, weights))
    rest = (shape.layers * shape.layer_other_params + shape.hidden
            + shape.embedding_params * (1 if shape.tied else 2)) * shape.source_bytes
    return quantized + rest, 8 * quantized / weights


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def gpu_needed(allocated: int) -> int:
    """Card memory for a peak of allocated tensor bytes: the allocator's slack and the CUDA context on top."""
    return int(allocated * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT if allocated else 0


OPTION_NAMES = {"nsamples": "--nsamples", "seqlen": "--seqlen", "eval_chunk": "--chunk-tokens",
                "eval_windows": "--max-windows"}  # as `lowbit quantize` / `lowbit eval` spell them


def plan(config: dict, s: PlanSettings, gpu_bytes: int | None = None, host_bytes: int | None = None,
         ranks: int = 1) -> dict:
    """Everything `lowbit plan` prints: peaks of quantization and evaluation, output size, fits, suggestions;
    with RANKS, those of each rank under torchrun (quantize/plan_ranks.py)."""
    shape = model_shape(config)
    check_settings(shape, s)
    if not 1 <= ranks <= min(s.nsamples, s.eval_windows):
        raise UsageError(f"ranks must be at least 1 and at most the windows ({s.nsamples} calibration, "
                         f"{s.eval_windows} evaluation), not {ranks}")
    result = _verdict(shape, s, gpu_bytes, host_bytes, ranks)
    size, bits_per_weight = output_size(shape, s)
    result.update(
        model={"architecture": shape.architecture, "layers": shape.layers, "hidden": shape.hidden,
               "intermediate": shape.intermediate, "vocab": shape.vocab,
               "parameters": shape.layers * shape.layer_params + shape.embedding_params * (1 if shape.tied else 2) + shape.hidden},
        settings={"method": s.method, "bits": s.bits, "group_size": s.group_size, "calibrated": s.uses_activations,
                  "nsamples": s.nsamples,
                  "seqlen": s.seqlen, "device": s.device, "compute_bytes": s.c, "offload": s.offload,
                  "eval_windows": s.eval_windows, "eval_seqlen": s.eval_seqlen, "eval_chunk": s.eval_chunk,
                  "eval_offload": s.eval_offload, "ranks": ranks},
        output_bytes=size, bits_per_weight=round(bits_per_weight, 4),
        limits={"gpu_bytes": gpu_bytes, "host_bytes": host_bytes},
    )
    result["suggestions"] = [] if result["fits"] else suggestions(shape, s, gpu_bytes, host_bytes, ranks)
    return result


def check_settings(shape: ModelShape, s: PlanSettings) -> None:
    for name in ("nsamples", "seqlen", "eval_windows", "eval_seqlen", "eval_chunk"):
        if getattr(s, name) < 1:
            raise UsageError(f"{name} must be at least 1")
    if s.method in GPTQ_FORMAT_METHODS and s.group_size != -1:
        bad = [l.name for l in shape.linears if l.in_features % s.group_size]
        if bad:
            raise UsageError(f"group size {s.group_size} does not divide in_features of {bad[0]}")


def _verdict(shape: ModelShape, s: PlanSettings, gpu_bytes: int | None, host_bytes: int | None,
             ranks: int = 1) -> dict:
    q_device, q_host = peaks(rank_quantize_phases(shape, s, ranks), s)
    e_device, e_host = peaks(rank_eval_phases(shape, s, ranks), s)

    def entry(device: Peak, host: Peak) -> dict:
        needed = gpu_needed(device.bytes)
        fits_gpu = gpu_bytes is None or s.device == "cpu" or needed <= gpu_bytes
        fits_host = host_bytes is None or host.bytes <= host_bytes
        return {"gpu_peak_bytes": device.bytes, "gpu_needed_bytes": needed, "gpu_phase": device.phase,
                "gpu_parts": device.parts, "host_peak_bytes": host.bytes, "host_phase": host.phase,
                "host_parts": host.parts, "fits_gpu": fits_gpu, "fits_host": fits_host, "fits": fits_gpu and fits_host}

    quantize, evaluate = entry(q_device, q_host), entry(e_device, e_host)
    return {"quantize": quantize, "evaluate": evaluate, "fits": quantize["fits"] and evaluate["fits"]}


def suggestions(shape: ModelShape, s: PlanSettings, gpu_bytes: int | None, host_bytes: int | None,
                ranks: int = 1) -> list[dict]:
    """Changes of settings that make the part that does not fit fit, each with what it costs.

    Tried in order of cost: offloading, then (with offloading if it alone is not enough) halving the
    calibration windows or their length, then the CPU; for evaluation a smaller head chunk, offloading,
    fewer windows. A part nothing rescues gets an entry without an option.
    """
    out: list[dict] = []
    base = _verdict(shape, s, gpu_bytes, host_bytes, ranks)
    on_gpu = s.device != "cpu"

    def fits(option: str, changed: PlanSettings, part: str, cost: str) -> bool:
        verdict = _verdict(shape, changed, gpu_bytes, host_bytes, ranks)[part]
        if verdict["fits"]:
            gpu_needed = verdict["gpu_needed_bytes"] if changed.device != "cpu" else None
            out.append({"for": part, "option": option, "gpu_needed_bytes": gpu_needed,
                        "host_peak_bytes": verdict["host_peak_bytes"], "cost": cost})
        return verdict["fits"]

    def halve(part: str, name: str, smallest: int, prefix: str, template: PlanSettings, cost) -> None:
        value = getattr(s, name) // 2
        while value >= smallest and not fits(f"{prefix}{OPTION_NAMES[name]} {value}",
                                             replace(template, **{name: value}), part, cost(value)):
            value //= 2

    if not base["quantize"]["fits"] and not base["quantize"]["fits_host"] and s.fp_targets:
        fits("--no-fp-targets", replace(s, quantize=replace(s.quantize, fp_targets=False)), "quantize",
             "each Linear fit to its own inputs only: the error of the layers before it is not made up "
             "(at 3 bits and in calibrated NF4, a larger perplexity delta)")
    if not base["quantize"]["fits"]:
        tokens = s.nsamples * s.seqlen
        acts = tokens * shape.hidden * s.c
        passes = shape.layers * (len(shape.groups) + 2)
        offload = on_gpu and not s.offload and not base["quantize"]["fits_gpu"]  # it helps the GPU only
        if not offload or not fits("--offload", replace(s, offload=True), "quantize",
                                   f"activations ({gib(acts)}) in host memory; each of {passes} passes over them "
                                   f"crosses PCIe ({passes * acts / GiB:.0f} GiB in all)"):
            template = replace(s, offload=s.offload or offload)
            prefix = "--offload " if offload else ""
            halve("quantize", "nsamples", 1, prefix, template,
                  lambda v: f"calibrates on {v * s.seqlen} tokens instead of {tokens}: noisier Hessians")
            halve("quantize", "seqlen", 128, prefix, template,
                  lambda v: f"calibrates on {s.nsamples * v} tokens instead of {tokens}, in shorter contexts")
        if on_gpu:
            fits("--device cpu", replace(s, device="cpu"), "quantize",
                 "runs on the CPU in float32: hours instead of minutes for a large model")
    if not base["evaluate"]["fits"]:
        halve("evaluate", "eval_chunk", 16, "lowbit eval ", s, lambda v: "the same figures, from more, smaller head matmuls")
        if on_gpu and not s.eval_offload:
            fits("lowbit eval --offload", replace(s, eval_offload=True), "evaluate",
                 "final hidden states in host memory; each layer's pass moves them over PCIe")
        halve("evaluate", "eval_windows", 1, "lowbit eval ", s,
              lambda v: f"scores {v * (s.eval_seqlen - 1)} tokens instead of {s.eval_windows * (s.eval_seqlen - 1)}: "
                        f"a noisier perplexity")
    for part in ("quantize", "evaluate"):
        if not base[part]["fits"] and not any(tip["for"] == part for tip in out):
            where = "gpu" if not base[part]["fits_gpu"] else "host"
            parts = base[part][f"{where}_parts"]
            largest = max(parts, key=parts.get)
            out.append({"for": part, "option": None, "gpu_needed_bytes": None, "host_peak_bytes": None,
                        "cost": f"no setting here makes it fit: its {where} peak is at '{base[part][f'{where}_phase']}', "
                                f"where {largest} alone is {gib(parts[largest])}"})
    return out


# ---- the engine's automatic decisions ----

HOST_SHARE = 0.9  # of the host's memory a run may plan to use: the system and its other processes keep the rest


def host_memory_bytes() -> int | None:
    """The host's physical memory (not what is free now: a resumed run must decide as the first one did)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fp_targets_fit_host(config: dict, s: PlanSettings, host_bytes: int) -> bool:
    """Whether quantizing with fp targets (S has them on) fits HOST_BYTES of host memory, or is too large for it
    without them as well (then they are not what is short)."""
    shape = model_shape(config)
    _, host = peaks(quantize_phases(shape, s), s)
    if host.bytes <= host_bytes:
        return True
    without = replace(s, quantize=replace(s.quantize, fp_targets=False))
    _, host_without = peaks(quantize_phases(shape, without), without)
    return host_without.bytes > host_bytes


def should_offload(config: dict, s: PlanSettings, device: torch.device, part: str) -> bool:
    """Whether PART ("quantize": the calibration activations; "evaluate": the final hidden states) goes to host
    memory: on a GPU, when running it with them on the device would not fit its free memory. The free memory is
    after the CUDA context, so only the allocator's slack is added."""
    if device.type != "cuda":
        return False
    shape = model_shape(config)
    if part == "quantize":
        phases = quantize_phases(shape, replace(s, device="cuda", offload=False))
    else:
        phases = eval_phases(shape, replace(s, device="cuda", eval_offload=False))
    on_device, _ = peaks(phases, s)
    free, _ = torch.cuda.mem_get_info(device)
    return on_device.bytes * (1 + ALLOCATOR_SLACK) > free
