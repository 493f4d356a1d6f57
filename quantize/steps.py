"""True-sequential's stepwise passes through one decoder layer (sequential_steps), and the plain pass that
collects several groups' Hessians at once (collect_hessians).

Each step starts from what the step before kept: a pass stopped at a module's input, attention's
residual from o_proj's kept inputs, the MLP from the residual stream after attention, the layer's
outputs from down_proj's kept inputs. `steps_match_layer` checks that they compute the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.quantize.arch import Architecture, LayerNorms
from lowbit.quantize.solve import HessianAccumulator
from lowbit.quantize.stream import Activations


class StopForward(Exception):
    """Raised by a hook to end a forward early, once the inputs we measure have been seen."""


InputFn = Callable[[int, torch.Tensor], None]  # (window index, the module's input [seqlen, in_features])


class UpdateShare:
    """How much of the residual stream a sublayer's update makes up: the mean over tokens of
    ||u||^2 / ||h + u||^2, u the update (attention's or the MLP's, after any post-norm) and h + u the stream
    it leaves. Per token, so that the few tokens with massive activations do not drown the rest.
    A size budget weighs a Linear's relative output error by its sublayer's share (quantize/mixed.py)."""

    def __init__(self) -> None:
        self.total, self.tokens = 0.0, 0

    def add(self, hidden: torch.Tensor, update: torch.Tensor) -> None:
        after = (hidden + update).float().square().sum(-1)
        self.total += float((update.float().square().sum(-1) / after.clamp_min(1e-30)).sum())
        self.tokens += after.numel()


def run_layer_until(layer: nn.Module, acts: Activations, device: torch.device, stop_at: nn.Module,
                    on_input: dict[nn.Module, InputFn] | None = None) -> None:
    """Run every window through the layer until `stop_at` is about to run (it and what follows do not);
    on_input[m](i, x) sees module m's input for window i on the way."""
    acts.check_layer(layer)
    with input_hooks(on_input or {}, stop_at) as current:
        with torch.no_grad():
            for i in range(acts.hidden.shape[0]):
                current[0] = i
                try:
                    layer(acts.window(i, device), **acts.layer_kwargs)
                except StopForward:
                    pass


def run_attention_residual(layer: nn.Module, norms: LayerNorms, acts: Activations, o_proj: nn.Module,
                           o_proj_inputs: torch.Tensor, device: torch.device, on_mlp_input: InputFn,
                           share: UpdateShare | None = None) -> None:
    """Replace each window's layer input by the residual stream after attention, from o_proj's kept
    inputs (no attention recomputed); on_mlp_input(i, x) sees the MLP's input; share measures the update."""
    after_attention = layer.get_submodule(norms.after_attention) if norms.after_attention else None
    before_mlp = layer.get_submodule(norms.before_mlp)
    with torch.no_grad():
        for i in range(acts.hidden.shape[0]):
            out = o_proj(o_proj_inputs[i : i + 1].to(device))
            if after_attention is not None:
                out = after_attention(out)
            before = acts.window(i, device)  # one read: with offloading, a copy to the device
            if share is not None:
                share.add(before, out)
            hidden = before + out
            acts.hidden[i] = hidden[0].to(acts.hidden.device)
            on_mlp_input(i, before_mlp(hidden)[0])


def run_mlp_residual(layer: nn.Module, norms: LayerNorms, acts: Activations, device: torch.device,
                     stop_at: nn.Module | None = None, on_input: dict[nn.Module, InputFn] | None = None,
                     share: UpdateShare | None = None) -> None:
    """The layer's second half, from the residual stream after attention (run_attention_residual).
    Without stop_at, each window's output replaces its input; with it, the MLP stops there.
    share measures the MLP's update."""
    before_mlp = layer.get_submodule(norms.before_mlp)
    after_mlp = layer.get_submodule(norms.after_mlp) if norms.after_mlp else None
    with input_hooks(on_input or {}, stop_at) as current:
        with torch.no_grad():
            for i in range(acts.hidden.shape[0]):
                current[0] = i
                hidden = acts.window(i, device)
                try:
                    out = layer.mlp(before_mlp(hidden))
                except StopForward:
                    continue
                if after_mlp is not None:
                    out = after_mlp(out)
                if share is not None:
                    share.add(hidden, out)
                acts.hidden[i] = (hidden + out)[0].to(acts.hidden.device)
    if stop_at is None:  # the hidden states now enter the next layer
        acts.depth += 1


def run_down_residual(layer: nn.Module, norms: LayerNorms, acts: Activations, down: nn.Module,
                      down_inputs: torch.Tensor, device: torch.device, share: UpdateShare | None = None) -> None:
    """The layer's outputs from the residual stream after attention and down_proj's kept inputs: the MLP's
    output is down_proj's (no gate/up recomputed). Each window's output replaces its input; share measures
    the MLP's update."""
    after_mlp = layer.get_submodule(norms.after_mlp) if norms.after_mlp else None
    with torch.no_grad():
        for i in range(acts.hidden.shape[0]):
            out = down(down_inputs[i : i + 1].to(device))
            if after_mlp is not None:
                out = after_mlp(out)
            hidden = acts.window(i, device)
            if share is not None:
                share.add(hidden, out)
            acts.hidden[i] = (hidden + out)[0].to(acts.hidden.device)
    acts.depth += 1


@contextmanager
def input_hooks(on_input: dict[nn.Module, InputFn], stop_at: nn.Module | None):
    """Forward pre-hooks calling fn(window, input) and, on stop_at, raising StopForward after them.
    Yields a one-item list the caller sets to the current window index."""
    current = [0]

    def hook_for(fn: InputFn):
        def hook(module, inputs):
            x = inputs[0]
            fn(current[0], x.reshape(-1, x.shape[-1]))

        return hook

    def stop(module, inputs):
        raise StopForward

    handles = [module.register_forward_pre_hook(hook_for(fn)) for module, fn in on_input.items()]
    if stop_at is not None:
        handles.append(stop_at.register_forward_pre_hook(stop))  # after the input hooks: they run first
    try:
        yield current
    finally:
        for handle in handles:
            handle.remove()


def steps_match_layer(layer: nn.Module, norms: LayerNorms, o_proj: nn.Module, acts: Activations,
                      device: torch.device, down: nn.Module | None = None) -> bool:
    """Whether o_proj's input plus run_attention_residual and run_mlp_residual give what the layer's own
    forward gives, on the first window (a transformers release could change a layer's layout); with down,
    also run_down_residual from down_proj's input."""
    kept = {}
    hooks = {o_proj: lambda i, x: kept.setdefault("o", x.clone())}
    if down is not None:
        hooks[down] = lambda i, x: kept.setdefault("down", x.clone())
    with input_hooks(hooks, None), torch.no_grad():
        whole = layer(acts.window(0, device), **acts.layer_kwargs)
    whole = whole[0] if isinstance(whole, tuple) else whole
    close = lambda steps: torch.allclose(steps, whole, rtol=1e-3, atol=1e-5 * float(whole.abs().max()))  # noqa: E731
    one = Activations(hidden=acts.window(0, device).clone(), kwargs_by_layer=acts.kwargs_by_layer, depth=acts.depth)
    run_attention_residual(layer, norms, one, o_proj, kept["o"][None], device, lambda i, x: None)
    after_attention = one.hidden.clone()
    run_mlp_residual(layer, norms, one, device)
    if not close(one.hidden):
        return False
    if down is None:
        return True
    one.hidden, one.depth = after_attention, acts.depth
    run_down_residual(layer, norms, one, down, kept["down"][None], device)
    return close(one.hidden)


def sequential_steps(layer, arch: Architecture, acts: Activations, device, wanted, solve_group,
                      keep_down_inputs: bool = False, before_update: Callable[[], None] = lambda: None,
                      shares: tuple[UpdateShare, UpdateShare] | None = None, sample_rows: int = 0,
                      targets: dict[int, torch.Tensor] | None = None, first_row_weight: int = 1) -> None:
    """True-sequential at the cost of about one pass over the windows: each step starts from what the
    step before kept, with the groups before it already quantized.

    1. q/k/v: from the normed layer input (the pass stops there).
    2. o_proj: one pass through attention, keeping o_proj's input for every window.
    3. gate/up: o_proj (now quantized) applied to the kept inputs gives the residual stream after
       attention, which replaces the layer input in place; the MLP's input comes from it.
    4. down_proj: the MLP from that residual stream, up to down_proj's input, one window at a time.
       Its input is kept for every window where that is small (keep_down_inputs, plan.down_inputs_kept);
       at Phi-4's width it would be 9.4 GB at 128 x 2048, and is not.
    5. the layer's outputs, with down_proj quantized: from the kept inputs, or the MLP run again.
    shares, under a size budget: attention's and the MLP's updates measured on the way (steps.UpdateShare);
    sample_rows: how many input rows each group's Hessian keeps for per-token errors (solve.HessianAccumulator);
    targets: the unquantized inputs of group g, paired with the quantized ones window by window;
    first_row_weight: how many rows each window's first position counts as (solve.HessianAccumulator).
    """
    attention_share, mlp_share = shares or (None, None)
    attention_in, o_group, mlp_in, down_group = arch.groups
    module = layer.get_submodule

    def hessian_of(group) -> HessianAccumulator | None:
        if not wanted(group):
            return None
        return HessianAccumulator(module(group[0]).in_features, device, sample_rows,
                                  (targets or {}).get(arch.groups.index(group)), first_row_weight)

    hessian = hessian_of(attention_in)
    if hessian is not None:
        run_layer_until(layer, acts, device, stop_at=module(attention_in[0]),
                        on_input={module(attention_in[0]): lambda i, x: hessian.add(x, i)})
        solve_group(attention_in, hessian)
    del hessian  # each K x K Hessian is gone before the next is made

    o_proj = module(o_group[0])
    kept = acts.input_buffer(o_proj.in_features)
    hessian = hessian_of(o_group)

    def keep(i, x):
        kept[i] = x.to(kept.device)
        if hessian is not None:
            hessian.add(x, i)

    run_layer_until(layer, acts, device, stop_at=o_proj, on_input={o_proj: keep})
    if hessian is not None:
        solve_group(o_group, hessian)
    del hessian, keep

    hessian = hessian_of(mlp_in)
    before_update()  # steps 1 and 2 only read the layer input; step 3 replaces it
    run_attention_residual(layer, arch.norms, acts, o_proj, kept, device,
                           on_mlp_input=(lambda i, x: hessian.add(x, i)) if hessian is not None
                           else (lambda i, x: None),
                           share=attention_share)
    del kept
    if not keep_down_inputs:  # the room kept o_proj's inputs; the MLP's steps do not need it
        acts.release_buffer()
    if hessian is not None:
        solve_group(mlp_in, hessian)
    del hessian

    down = module(down_group[0])
    hessian = hessian_of(down_group)
    if hessian is None:  # down_proj skipped: the layer's second half as it is
        run_mlp_residual(layer, arch.norms, acts, device, share=mlp_share)
        return
    kept = acts.input_buffer(down.in_features) if keep_down_inputs else None

    def measure(i, x):
        hessian.add(x, i)
        if kept is not None:
            kept[i] = x.to(kept.device)

    run_mlp_residual(layer, arch.norms, acts, device, stop_at=down, on_input={down: measure})
    solve_group(down_group, hessian)
    del hessian, measure
    if kept is not None:
        run_down_residual(layer, arch.norms, acts, down, kept, device, share=mlp_share)
    else:
        run_mlp_residual(layer, arch.norms, acts, device, share=mlp_share)


def collect_hessians(layer, groups, acts: Activations, device, sample_rows: int = 0,
                      targets: list[torch.Tensor | None] | None = None,
                      first_row_weight: int = 1) -> list[HessianAccumulator]:
    """One pass over the windows from the layer's start, stopped at the last group's input, with a
    Hessian per group (paired with the group's unquantized inputs where TARGETS has them)."""
    accumulators = [HessianAccumulator(layer.get_submodule(g[0]).in_features, device, sample_rows, target,
                                       first_row_weight)
                    for g, target in zip(groups, targets or [None] * len(groups))]
    hooks = {layer.get_submodule(group[0]): (lambda i, x, acc=acc: acc.add(x, i))
             for group, acc in zip(groups, accumulators)}
    run_layer_until(layer, acts, device, stop_at=layer.get_submodule(groups[-1][0]), on_input=hooks)
    return accumulators
