"""`lowbit plan --ranks N`: the memory of each of torchrun's N ranks (quantize/distributed.py).

A rank holds its own block of the windows (the first blocks are one window longer when N does not divide
them): the activations, the kept o_proj inputs and the evaluator's hidden states shrink by N. The layer,
the Hessians and the solves do not: every rank sums a full K x K, and an owner solves as a single process
does. On top: the Hessian rows in flight while the partial sums are added up, and on rank 0 the block of
hidden states it receives, a window at a time, from each other rank when it saves a layer.
"""

from __future__ import annotations

from dataclasses import replace

from lowbit.quantize.arch import ModelShape
from lowbit.quantize.distributed import gather_bytes
from lowbit.quantize.plan import FLOAT32, Phase, PlanSettings, eval_phases, quantize_phases


def rank_settings(s: PlanSettings, ranks: int) -> PlanSettings:
    """The settings one rank runs with: the largest block of calibration and evaluation windows."""
    return replace(s, nsamples=-(-s.nsamples // ranks), eval_windows=-(-s.eval_windows // ranks))


def rank_quantize_phases(shape: ModelShape, s: PlanSettings, ranks: int) -> list[Phase]:
    """quantize_phases for the busiest rank, with the exchanges between ranks as phases of their own."""
    own = rank_settings(s, ranks)
    phases = quantize_phases(shape, own)
    if ranks == 1 or not own.uses_activations:
        return phases
    out = []
    for phase in phases:
        out.append(phase)
        if phase.name.startswith("Hessian pass up to"):
            width = max(g[0].in_features for g in shape.groups
                        if not own.quantize.true_sequential or phase.name.endswith(g[-1].name))
            out.append(Phase("sum the Hessians over the ranks",
                             device={**_without_pass(phase.device),
                                     "Hessian rows being summed": gather_bytes(width * width * FLOAT32)},
                             host=phase.host))
        if phase.name.startswith("save the layer"):
            window = own.seqlen * shape.hidden * own.c  # on the GPU under NCCL, in host memory under gloo
            out.append(Phase("save the layer: another rank's hidden states", device=phase.device,
                             host={**phase.host, "a window received from another rank": window}))
    return out


def rank_eval_phases(shape: ModelShape, s: PlanSettings, ranks: int) -> list[Phase]:
    return eval_phases(shape, rank_settings(s, ranks))


def _without_pass(parts: dict[str, int]) -> dict[str, int]:
    """What a Hessian pass holds once its windows have run: not their intermediates and updates."""
    return {k: v for k, v in parts.items() if k not in ("one window's intermediates", "Hessian update")}
