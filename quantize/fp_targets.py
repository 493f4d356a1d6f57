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

from lowbit.quantize.stream import Activations

log = logging.getLogger("lowbit")

FP_TARGET_SHARE = 0.25  # of the step to W*: BENCHMARKS.md, "fp-targets"
FP_INPUTS_KEPT_UP_TO = 4 * 2**30  # bytes of one group's unquantized inputs; above this the group fits its own


def fp_inputs_bytes(nsamples: int, seqlen: int, in_features: int, c: int) -> int:
    """Bytes of a group's unquantized inputs kept for every window (0: too large, that group is not fit to them)."""
    size = nsamples * seqlen * in_features * c
    return size if size <= FP_INPUTS_KEPT_UP_TO else 0


class FullPrecisionStream:
    """The hidden states of the unquantized model entering decoder layer `depth` (host memory), and the
    inputs of each group's first Linear in the last layer run (inputs[g]: [windows, seqlen, K], or absent
    where too large to keep).

    A layer's outputs go to a second buffer, which then takes the first's place: the hidden states saved
    with the layer before (progress.LayerSaver, in the background) are not written while they are read."""

    def __init__(self, hidden: Tensor, depth: int):
        self.hidden = hidden.to("cpu", copy=True)
        self.depth = depth
        self.inputs: dict[int, Tensor] = {}
        self._spare: Tensor | None = None

    def run_layer(self, layer: nn.Module, groups: list[tuple[str, ...]], acts: Activations,
                  device: torch.device) -> None:
        """Run every window through LAYER, still unquantized, keeping the inputs of each of GROUPS (their first
        Linear's); the outputs replace the hidden states. ACTS gives the layer's call arguments."""
        windows, seqlen = self.hidden.shape[:2]
        self.inputs = {}
        current, hooks = [0], []
        for g, group in enumerate(groups):
            module = layer.get_submodule(group[0])
            if not fp_inputs_bytes(windows, seqlen, module.in_features, acts.hidden.element_size()):
                if self.depth == 0:
                    log.warning("the unquantized inputs of %s are too large to keep (%s): fit to their own inputs",
                                "/".join(group), f"> {FP_INPUTS_KEPT_UP_TO / 2**30:.0f} GiB")
                continue
            kept = self.inputs[g] = torch.empty(windows, seqlen, module.in_features, dtype=acts.hidden.dtype)

            def hook(mod, inputs, kept=kept):
                kept[current[0]] = inputs[0].reshape(seqlen, -1).to("cpu")

            hooks.append(module.register_forward_pre_hook(hook))
        outputs = self._spare if self._spare is not None else torch.empty_like(self.hidden)
        try:
            with torch.no_grad():
                for i in range(windows):
                    current[0] = i
                    out = layer(self.hidden[i : i + 1].to(device), **acts.kwargs_by_layer[self.depth])
                    outputs[i] = (out[0] if isinstance(out, tuple) else out)[0].to("cpu")
        finally:
            for hook in hooks:
                hook.remove()
        self._spare, self.hidden = self.hidden, outputs
        self.depth += 1

    def release_inputs(self) -> None:
        self.inputs = {}


def fp_target_weight(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float,
                     share: float = FP_TARGET_SHARE) -> Tensor | None:
    """W + share * W C (H + damp * mean(diag H) I)^-1 in float32, on H's device: W [N, K], H and C = D X~^T
    [K, K] on the same scale (2/n sums). The damping is the solver's. None where the damped H has no
    Cholesky factor (the solver then retries with more damping, and W is left as it is)."""
    factor = hessian.to(torch.float32).clone()
    factor.diagonal().add_(damp * factor.diagonal().mean())
    _, info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32, device=factor.device)))
    if int(info) != 0:
        return None
    W = weight.to(device=cross.device, dtype=torch.float32)
    step = torch.cholesky_solve((W @ cross).T.contiguous(), factor).T  # H symmetric: (W C) H^-1 = (H^-1 (W C)^T)^T
    return W + share * step


def fit_to_fp_targets(layer: nn.Module, names: list[str], source_tensors: dict[str, Tensor], hessian: Tensor,
                      cross: Tensor, damp: float) -> None:
    """Put W* (fp_target_weight) in place of W for each of NAMES (a group's Linears, which share H and C): in the
    layer, and in SOURCE_TENSORS (the layer's tensors as read, in their dtype), which the solver reads."""
    for name in names:
        linear = layer.get_submodule(name)
        target = fp_target_weight(linear.weight.detach(), hessian, cross, damp)
        if target is None:
            log.warning("%s: damped Hessian not positive definite; fit to its own inputs only", name)
            return
        linear.weight.data = target.to(linear.weight.device, linear.weight.dtype)
        key = name + ".weight"
        if key in source_tensors:
            source_tensors[key] = target.to(source_tensors[key].device, source_tensors[key].dtype)
        del target
