"""Under torchrun, one decoder layer's solves: each group's Hessian summed over the ranks for the owners of
its Linears, and each solve shared (the quantized weight with every rank, its tensors with rank 0).

In a single process (quantize/distributed.py's SINGLE) every Linear is the process's own and nothing moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from lowbit.quantize.distributed import SINGLE, Ranks
from lowbit.quantize.solve import HessianAccumulator, SolvedLinear

Solve = tuple[SolvedLinear, dict]  # a Linear's solve (without its dequantized weight) and its stats


@dataclass(frozen=True)
class Solvers:
    """Who solves what in decoder layer LAYER: every Linear here in a single process, under torchrun its owner."""

    ranks: Ranks = SINGLE
    layer: int = 0

    def owners(self, names: list[str], order: list[str]) -> dict[str, int]:
        """The owner rank of each of NAMES, by its place in the layer's ORDER of Linears."""
        return {name: self.ranks.owner(self.layer, order.index(name)) for name in names}


def group_hessian(accumulator: HessianAccumulator, ranks: Ranks,
                  keep: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The group's float32 Hessian over every rank's windows (their partial sums added in rank order) where
    KEEP (a Linear of the group is solved here), and its cross sum with the unquantized inputs (None without
    them); (None, None) elsewhere. The accumulator is spent."""
    total = ranks.sum_rows(accumulator.sum, keep)
    cross = ranks.sum_rows(accumulator.cross, keep) if accumulator.cross is not None else None
    accumulator.rows = ranks.sum_count(accumulator.rows, "summing Hessians")
    hessian = accumulator.mean() if total is not None else None
    cross = accumulator.cross_mean() if cross is not None else None
    accumulator.sum = accumulator.cross = None
    return hessian, cross


def share_solves(layer: nn.Module, owners: dict[str, int], solved_here: dict[str, Solve],
                 ranks: Ranks) -> Iterator[tuple[str, Solve]]:
    """Each Linear's weight (already the quantized one in its owner's layer) from its owner to every rank's
    layer; yields (name, its solve) in OWNERS' order on rank 0, nothing on the others."""
    for name, owner in owners.items():
        linear = layer.get_submodule(name)
        if owner != ranks.rank:
            linear.weight.data = torch.empty_like(linear.weight)
        ranks.broadcast_(linear.weight.data, owner)
        solve = solved_here.pop(name, None)
        if owner != 0 and solve is not None:
            solve = on_host(solve)
        solve = ranks.to_primary(solve, owner)
        if ranks.primary:
            yield name, solve


def without_dequantized(solved: SolvedLinear, weight: torch.Tensor) -> SolvedLinear:
    """What a solve keeps until it is shared, once its dequantized weight is in the layer as WEIGHT: the tensors
    to write, the candidates, and the dequantized weight only where it is WEIGHT itself (no second copy)."""
    shared = solved.dequantized.data_ptr() == weight.data_ptr() and solved.dequantized.dtype == weight.dtype
    return solved if shared else replace(solved, dequantized=None)


def on_host(solve: Solve) -> Solve:
    """A solve's tensors in host memory, to travel to rank 0 (a GPU tensor would arrive on rank 0's GPU of that number)."""
    solved, stats = solve
    tensors = {k: v.cpu() for k, v in solved.tensors.items()}
    candidates = {fmt: ({k: v.cpu() for k, v in t.items()}, error) for fmt, (t, error) in solved.candidates.items()}
    return replace(solved, tensors=tensors, candidates=candidates, dequantized=None), stats


def keep_candidates(candidates: dict[str, dict[str, torch.Tensor]], stats: dict, module: str,
                    solved: SolvedLinear) -> None:
    """File a Linear's other candidate formats: tensors by format tag, errors in its stats."""
    if not solved.candidates:
        return
    stats["candidates"] = {}
    for fmt, (tensors, error) in solved.candidates.items():
        candidates.setdefault(fmt.tag, {}).update({f"{module}.{k}": v for k, v in tensors.items()})
        stats["candidates"][fmt.tag] = error
