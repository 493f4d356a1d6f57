"""Fit each Linear towards the unquantized model's outputs, not only to its own inputs (GPTAQ, "GPTQv2").

GPTQ minimises ||(W - Q) X~||^2, X~ the inputs that the layers already quantized give. Those inputs carry
the earlier layers' error; the unquantized model's own inputs X do not. The asymmetric objective
||Q X~ - W X||^2 lets a Linear take back part of what came before it. With D = X - X~ and H = X~ X~^T:

    ||Q X~ - W X||^2 = ||(W* - Q) X~||^2 + a constant,   W* = W + W D X~^T H^-1

so the unchanged solver, given W* in place of W, minimises it. The full step fits the calibration windows
too closely (on Gemma-3-270M 4g128 it took the perplexity delta from +3.8 to +6.8); a quarter of it,
the share GPTAQ's authors also use, measured best: FP_TARGET_SHARE.

The unquantized hidden states run alongside the quantized ones (FullPrecisionStream): each decoder layer
is first run unquantized, keeping the inputs of each group's Linears, which the Hessian passes then pair
window by window with the quantized inputs (solve.HessianAccumulator's cross sum, D X~^T).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lowbit.quantize.steps import input_hooks
from lowbit.quantize.stream import Activations
from lowbit.quantize.sweep import ROWS_AT_ONCE

log = logging.getLogger("lowbit")

FP_TARGET_SHARE = 0.25  # of the step to W*: BENCHMARKS.md, "fp-targets-notes"
FP_INPUTS_KEPT_UP_TO = 4 * 2**30  # bytes of one group's unquantized inputs; above this the group fits its own


def fp_inputs_bytes(nsamples: int, seqlen: int, in_features: int, c: int) -> int:
    """Bytes of a group's unquantized inputs kept for every window (0: too large, that group is not fit to them)."""
    size = nsamples * seqlen * in_features * c
    return size if size <= FP_INPUTS_KEPT_UP_TO else 0


class FullPrecisionStream:
    """The hidden states of the unquantized model entering decoder layer `depth` (host memory), and the
    inputs of each group's first Linear in the last layer run (inputs[g]: [windows, seqlen, K], or absent
    where too large to keep).

    With DOUBLE_BUFFER a layer's outputs go to a second buffer, which then takes the first's place: the hidden
    states saved with the layer before, in the background (progress.LayerSaver, where the activations are in
    host memory), are not written while they are read. Otherwise each output replaces its input."""

    def __init__(self, hidden: Tensor, depth: int, double_buffer: bool = True):
        self.hidden = hidden.to("cpu", copy=True)
        self.depth = depth
        self.inputs: dict[int, Tensor] = {}
        self.double_buffer = double_buffer
        self._spare: Tensor | None = None

    def run_layer(self, layer: nn.Module, groups: list[tuple[str, ...]], acts: Activations,
                  device: torch.device) -> None:
        """Run every window through LAYER, still unquantized, keeping the inputs of each of GROUPS (their first
        Linear's); the outputs replace the hidden states. ACTS gives the layer's call arguments.

        The last layer's input buffers are written over where their shape is the same: fresh host memory
        costs a page fault per 4 KiB on first touch (stream.Activations.input_buffer), about 4 s a run for
        Gemma-3-270M's 570 MB of inputs a layer at 64 x 512."""
        windows, seqlen = self.hidden.shape[:2]
        rooms, self.inputs = self.inputs, {}
        hooks = {}
        for g, group in enumerate(groups):
            module = layer.get_submodule(group[0])
            if not fp_inputs_bytes(windows, seqlen, module.in_features, acts.hidden.element_size()):
                if self.depth == 0:
                    log.warning("the unquantized inputs of %s are too large to keep (%s): fit to their own inputs",
                                "/".join(group), f"> {FP_INPUTS_KEPT_UP_TO / 2**30:.0f} GiB")
                continue
            shape, room = (windows, seqlen, module.in_features), rooms.get(g)
            kept = self.inputs[g] = room if room is not None and room.shape == shape else torch.empty(
                shape, dtype=acts.hidden.dtype)
            hooks[module] = lambda i, x, kept=kept: kept[i].copy_(x)
        del rooms
        outputs = self.hidden if not self.double_buffer else (
            self._spare if self._spare is not None else torch.empty_like(self.hidden))
        with torch.no_grad(), input_hooks(hooks, None) as current:
            for i in range(windows):
                current[0] = i
                out = layer(self.hidden[i : i + 1].to(device), **acts.kwargs_by_layer[self.depth])
                outputs[i] = (out[0] if isinstance(out, tuple) else out)[0].to("cpu")
        if self.double_buffer:
            self._spare, self.hidden = self.hidden, outputs
        self.depth += 1


def damped_factor(hessian: Tensor, damp: float) -> Tensor | None:
    """The lower Cholesky factor of H + damp * mean(diag H) I (the solver's damping), float32 on H's device;
    None where there is none (the solver then retries with more damping, and W is left as it is)."""
    factor = hessian.to(torch.float32).clone()
    factor.diagonal().add_(damp * factor.diagonal().mean())
    _, info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32, device=factor.device)))
    return factor if int(info) == 0 else None


def fp_target_rows(rows: Tensor, factor: Tensor, cross: Tensor, share: float = FP_TARGET_SHARE) -> Tensor:
    """W + share * W C H^-1 for rows of W [n, K], in float32 on the factor's device (C = D X~^T on H's scale).
    H is symmetric, so (W C) H^-1 = (H^-1 (W C)^T)^T: one triangular solve pair on the factor."""
    W = rows.to(device=factor.device, dtype=torch.float32)
    return W + share * torch.cholesky_solve((W @ cross).T.contiguous(), factor).T


def fit_to_fp_targets(layer: nn.Module, names: list[str], source_tensors: dict[str, Tensor], hessian: Tensor,
                      cross: Tensor, damp: float) -> None:
    """Put W* in place of W for each of NAMES (a group's Linears, which share H and C): in the layer, and in
    SOURCE_TENSORS (the layer's tensors as read, in their dtype), which the solver reads. One factor for the
    group; each weight ROWS_AT_ONCE rows at a time, so that the float32 temporaries stay small beside the
    weight (Phi-4's gate_up_proj whole: 2.7 GiB of them)."""
    factor = damped_factor(hessian, damp)
    if factor is None:
        log.warning("%s: damped Hessian not positive definite; fit to its own inputs only", "/".join(names))
        return
    for name in names:
        linear = layer.get_submodule(name)
        target = torch.empty_like(linear.weight)
        for start in range(0, target.shape[0], ROWS_AT_ONCE):
            rows = slice(start, start + ROWS_AT_ONCE)
            target[rows] = fp_target_rows(linear.weight.detach()[rows], factor, cross)
        linear.weight.data = target
        key = name + ".weight"
        if key in source_tensors:
            source_tensors[key] = target.to(source_tensors[key].device, source_tensors[key].dtype)
        del target
