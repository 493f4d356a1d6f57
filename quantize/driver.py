"""Quantize a model layer by layer into a standard checkpoint, resumably.

    source safetensors --read one layer--> solver per Linear --> layer file on disk
                                      (Hessians from calibration activations, GPTQ / calibrated NF4)
    all layer files + embeddings/norm/head --stream--> sharded output, config, manifest

Progress is kept as it goes (quantize/progress.py): re-running the same command
continues where a killed run stopped; a run with other settings or inputs refuses.
The final shards, config and manifest are written by quantize/assemble.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.quantize.arch import Architecture
from lowbit.quantize.assemble import assemble
from lowbit.quantize.distributed import SINGLE, Ranks, joined, rank_device
from lowbit.quantize.job import ProgressFn, QuantizeJob, RunOptions, cleanup_on_bad_input, open_job
from lowbit.quantize.fit import should_offload
from lowbit.quantize.fp_targets import FullPrecisionStream, fit_to_fp_targets
from lowbit.quantize.input_scales import InputScaling, group_input_scale
from lowbit.quantize.plan import PlanSettings, down_inputs_kept
from lowbit.quantize.progress import LayerSaver, read_activations, save_layer
from lowbit.quantize.settings import QuantizeSettings
from lowbit.quantize.shared_solves import Solvers, group_hessian, keep_candidates, share_solves, without_dequantized
from lowbit.quantize.solve import (TOKEN_SAMPLE_ROWS, HessianAccumulator, SolvedLinear, first_row_weight, make_solver,
                                  relative_output_error, solve_stacked, solved_together)
from lowbit.quantize.steps import UpdateShare, collect_hessians, sequential_steps, steps_match_layer
from lowbit.quantize.stream import (Activations, build_skeleton, each_layer, embed_windows, load_config, matmul_precision,
                                   pick_device, release_free_heap, run_layer)
from lowbit.quantize.writer import output_lock, publish_folder

log = logging.getLogger("lowbit")


@dataclass
class QuantizeResult:
    output: Path
    manifest: dict
    seconds: float
    resumed_from_layer: int = 0
    primary: bool = True  # False on torchrun's other ranks: rank 0 wrote the output


def quantize_model(
    model: str,
    output: Path,
    settings: QuantizeSettings,
    calibration=None,  # lowbit.calibration.windows.CalibrationConfig (anything with .build(tokenizer)), or None
    options: RunOptions = RunOptions(),
    on_progress: ProgressFn | None = None,
) -> QuantizeResult:
    """The whole `lowbit quantize`: returns once OUTPUT holds a complete checkpoint."""
    output = Path(output)
    with joined(rank_device(pick_device(options.device))) as ranks:
        if not ranks.primary:  # rank 0 alone touches OUTPUT
            return _quantize_model_locked(model, output, settings, calibration, options, None, ranks)
        with output_lock(output):
            return _quantize_model_locked(model, output, settings, calibration, options, on_progress, ranks)


def _quantize_model_locked(model: str, output: Path, settings: QuantizeSettings, calibration, options: RunOptions,
                           on_progress: ProgressFn | None, ranks: Ranks = SINGLE) -> QuantizeResult:
    started = time.time()
    job = open_job(model, output, settings, calibration, options, on_progress, ranks)
    layers_done = job.progress["layers_done"]
    if layers_done and ranks.primary:
        log.info("resuming %s from layer %d of %d", output, layers_done, job.arch.num_layers)
    with cleanup_on_bad_input(job):
        solve_layers(job, ranks)
        if not ranks.primary:
            return QuantizeResult(output, {}, time.time() - started, layers_done, primary=False)
        manifest = assemble(job)
    publish_folder(job.work, output)
    return QuantizeResult(output, manifest, time.time() - started, resumed_from_layer=layers_done)


def solve_layers(job: QuantizeJob, ranks: Ranks = SINGLE) -> None:
    """Every decoder layer not yet in the progress folder, quantized and saved there (with its candidates)."""
    solve = make_solver(job.settings)
    if job.windows is not None:
        _quantize_calibrated(job, solve, ranks)
    elif ranks.primary:  # nothing to split without calibration windows: rank 0 does it all
        _quantize_weights_only(job, solve)


def _quantize_weights_only(job: QuantizeJob, solve) -> None:
    """RTN and plain NF4 need no activations: read a tensor, quantize it, keep only the result."""
    arch, reader, settings, progress_dir, progress, report = (job.arch, job.reader, job.settings, job.progress_dir,
                                                             job.progress, job.report)
    linears = set(arch.linear_names())
    for i in range(progress["layers_done"], arch.num_layers):
        prefix = arch.layer_prefix(i)
        if i + 1 < arch.num_layers:
            reader.prefetch_prefix(arch.layer_prefix(i + 1))
        out: dict[str, torch.Tensor] = {}
        stats: dict[str, dict] = {}
        candidates: dict[str, dict[str, torch.Tensor]] = {}
        for name in [n for n in reader.names() if n.startswith(prefix)]:
            module, _, kind = name[len(prefix):].rpartition(".")
            if module in linears and kind == "bias" and not settings.is_skipped(prefix + module):
                continue  # written with its weight
            if module not in linears or kind != "weight" or settings.is_skipped(prefix + module):
                out[name] = reader.read(name)
                continue
            weight = reader.read(name)
            bias_name = prefix + module + ".bias"
            bias = reader.read(bias_name) if bias_name in reader else None
            solved = solve(weight, None, bias)  # in its own dtype: bitsandbytes records it
            out.update({f"{prefix}{module}.{k}": v for k, v in solved.tensors.items()})
            stats[prefix + module] = {"error": relative_output_error(weight.float(), solved.dequantized, None), **solved.stats}
            keep_candidates(candidates, stats[prefix + module], prefix + module, solved)
        save_layer(progress_dir, i, out, progress, stats, None, candidates)
        release_free_heap()
        report("quantize", i + 1, arch.num_layers)


def _quantize_calibrated(job: QuantizeJob, solve, ranks: Ranks = SINGLE) -> None:
    """GPTQ's layer-by-layer loop: Hessians from the activations, solve each Linear, move on.
    Under torchrun each rank runs its own block of the windows (quantize/distributed.py)."""
    source, config, arch, reader, settings, options = job.source, job.config, job.arch, job.reader, job.settings, job.options
    windows, device, dtype, progress_dir, progress, report = (job.windows, job.device, job.dtype, job.progress_dir,
                                                             job.progress, job.report)
    skeleton = build_skeleton(load_config(source.folder, options.trust_remote_code), options.trust_remote_code)
    block, count = ranks.windows(windows.shape[0]), windows.shape[0]
    windows = windows[block]
    offload = options.offload
    if offload is None:
        plan = PlanSettings(quantize=settings, nsamples=windows.shape[0], seqlen=windows.shape[1],
                                          compute_bytes=dtype.itemsize)
        offload = should_offload(config, plan, device, "quantize")
    start = progress["layers_done"]
    embed = reader.read(arch.embed_name)
    if start == 0:
        acts = embed_windows(skeleton, embed, windows, device, dtype, offload)
    else:  # the layer arguments come from one window; the hidden states from disk
        acts = embed_windows(skeleton, embed, windows[:1], device, dtype, offload)
        hidden = read_activations(progress_dir / f"activations-{start:05d}.safetensors", block)
        acts.hidden, acts.depth = hidden.to(acts.hidden.device), start
    in_background = acts.hidden.device.type == "cpu" and ranks.world == 1  # the layer's state saved in a thread
    fp_stream = None
    if settings.fp_targets:  # the unquantized model's hidden states, alongside
        fp_stream = FullPrecisionStream(acts.hidden if start == 0 else read_activations(
            progress_dir / f"fp-activations-{start:05d}.safetensors", block), start, double_buffer=in_background)
    del embed
    steps, scaling = None, InputScaling.of(arch, config, settings)
    with matmul_precision(settings.fast_matmul), LayerSaver(in_background) as saver:
        for i, layer, source_tensors in each_layer(skeleton, arch, reader.read_prefix, device, dtype, start,
                                                   report if ranks.primary else None, "quantize",
                                                   prefetch=reader.prefetch_prefix):
            if steps is None:  # once a run, as rank 0 finds (its first window is the first of all)
                steps = tuple(ranks.from_primary(_stepwise_possible(layer, arch, settings, acts, device)))
            if fp_stream is not None:  # before any of the layer's weights is quantized
                fp_stream.run_layer(layer, arch.groups, acts, device)
            out, stats, candidates = _quantize_layer(layer, arch.layer_prefix(i), arch, settings, solve,
                                                     source_tensors, acts, device, *steps, Solvers(ranks, i),
                                                     before_update=saver.wait, scaling=scaling,
                                                     targets=fp_stream.inputs if fp_stream is not None else None)
            fp_hidden = fp_stream.hidden if fp_stream is not None else None
            if ranks.primary:
                saver.save(progress_dir, i, out, progress, stats, acts, candidates, ranks, count, fp_hidden)
            else:  # in the order rank 0 saves them (progress.save_layer_state)
                if fp_hidden is not None:
                    ranks.send_to_primary(fp_hidden)
                ranks.send_to_primary(acts.hidden)
            del out, candidates


def _stepwise_possible(layer, arch: Architecture, settings: QuantizeSettings, acts: Activations,
                       device) -> tuple[bool, bool]:
    """(Whether true-sequential can take the stepwise passes (steps.sequential_steps), whether they keep down_proj's
    inputs): the architecture's layout is described, computing a layer from its steps gives what its forward
    gives, and down_proj's inputs are small enough to keep (plan.down_inputs_kept)."""
    if not settings.true_sequential or arch.norms is None or len(arch.groups) != 4:
        return False, False
    o_proj, down = layer.get_submodule(arch.groups[1][0]), layer.get_submodule(arch.groups[3][0])
    windows, seqlen = acts.hidden.shape[:2]
    if down_inputs_kept(windows, seqlen, down.in_features, acts.hidden.element_size()):
        if steps_match_layer(layer, arch.norms, o_proj, acts, device, down):
            return True, True
    if steps_match_layer(layer, arch.norms, o_proj, acts, device):
        return True, False
    log.warning("%s layers do not compute as their layout describes; re-running each layer per group", arch.name)
    return False, False


def _quantize_layer(layer, prefix, arch, settings, solve, source_tensors, acts, device, stepwise: bool = False,
                    keep_down_inputs: bool = False, solvers: Solvers = Solvers(),
                    before_update: Callable[[], None] = lambda: None, scaling: InputScaling | None = None,
                    targets: dict[int, torch.Tensor] | None = None):
    """Quantize the Linears of one loaded decoder layer, group by group, and move the activations on
    to the next layer (the quantized layer's outputs). Returns (tensors to write, stats, the tensors of
    each other candidate format under a size budget, by format tag); under torchrun complete on rank 0.
    BEFORE_UPDATE runs before the first write to the activations (the last layer's save may still read them).
    SCALING: AWQ's input scales, searched for each group and folded into its producer's tensors.
    TARGETS: the unquantized model's inputs of group g's Linears, where each is fit to them (fp_targets.py)."""
    targets = targets or {}
    out = {prefix + name: t for name, t in source_tensors.items()}  # norms etc. stay as they are
    stats: dict[str, dict] = {}
    candidates: dict[str, dict[str, torch.Tensor]] = {}

    def wanted(group) -> bool:
        return not all(settings.is_skipped(prefix + m) for m in group)

    ranks, order = solvers.ranks, arch.linear_names()

    @matmul_precision(fast=False)  # the passes may run fast; the solver, the input-scale search and the errors do not
    def solve_group(group, accumulator: HessianAccumulator) -> None:
        names = [name for name in group if not settings.is_skipped(prefix + name)]
        owners = solvers.owners(names, order)
        mine = [name for name in names if owners[name] == ranks.rank]
        sample = accumulator.sample() if mine else None  # under a size budget: per-token errors (mixed.py)
        hessian, cross = group_hessian(accumulator, ranks, keep=bool(mine))
        if cross is not None:
            fit_to_fp_targets(layer, names, source_tensors, hessian, cross, settings.damp)
        del cross
        index = arch.groups.index(group)
        scale = group_input_scale(scaling, layer, source_tensors, names, owners[names[0]] if names else 0, index,
                                  hessian, ranks)
        if sample is not None and scale is not None:  # the input W s sees: x / s
            sample = sample.div_(scale.cpu())
        solved_here = {}
        shapes = lambda names_: [tuple(layer.get_submodule(n).weight.shape) for n in names_]  # noqa: E731
        together = solved_together(shapes(mine), shapes(order), settings)
        for chunk in ([mine] if together else [[name] for name in mine]):
            # the solver consumes the Hessian: the last solve here gets it, the others a copy
            shared = hessian if chunk[-1] == mine[-1] else hessian.clone()
            try:
                solves = (_solve_together(layer, chunk, settings, source_tensors, shared, scale) if together else
                          [_solve_linear(layer, chunk[0], solve, source_tensors, shared, True, scale, sample)])
            except LowbitError as e:
                raise type(e)(f"{prefix}{'+'.join(chunk)}: {e}") from None
            for name, (solved, stat) in zip(chunk, solves):
                solved_here[name] = (without_dequantized(solved, layer.get_submodule(name).weight.data), stat)
            del shared, solves
        del hessian, sample
        for name, (solved, stat) in share_solves(layer, owners, solved_here, ranks):  # rank 0's part
            for key in ("weight", "bias"):
                out.pop(f"{prefix}{name}.{key}", None)
            stats[prefix + name] = stat
            out.update({f"{prefix}{name}.{k}": v for k, v in solved.tensors.items()})
            keep_candidates(candidates, stat, prefix + name, solved)
        if scale is not None and ranks.primary:
            scaling.fold_everywhere(out, candidates, prefix, index, scale, settings.target_bpw is not None)

    sample_rows = TOKEN_SAMPLE_ROWS if settings.target_bpw is not None else 0
    first_weight = first_row_weight(settings.first_position_share, acts.hidden.shape[1])
    if stepwise:
        shares = (UpdateShare(), UpdateShare()) if settings.target_bpw is not None else None
        sequential_steps(layer, arch, acts, device, wanted, solve_group, keep_down_inputs, before_update, shares,
                          sample_rows, targets, first_weight)
        if shares is not None:
            _record_update_shares(stats, prefix, arch, shares, ranks)
        return out, stats, candidates
    groups = [g for g in arch.groups if wanted(g)]
    # true sequential: each group's Hessian is measured with the earlier groups already quantized
    batches = [[g] for g in groups] if settings.true_sequential else [groups]
    for batch in batches:
        hessians = collect_hessians(layer, batch, acts, device, sample_rows,
                                     [targets.get(arch.groups.index(g)) for g in batch], first_weight)
        for group, hessian in zip(batch, hessians):
            solve_group(group, hessian)
        del hessians, hessian  # K x K each: gone before the next Hessian pass
    before_update()
    run_layer(layer, acts, device, update=True)  # the next layer sees the quantized layer's outputs
    return out, stats, candidates


def _record_update_shares(stats: dict, prefix: str, arch: Architecture, shares, ranks: Ranks) -> None:
    """Each Linear's sublayer share (steps.UpdateShare, over all ranks' windows) into its stats: a size
    budget's "update" weighting reads it (quantize/mixed.py)."""
    what = "summing the sublayers' shares of the residual stream"
    for groups, share in ((arch.groups[:2], shares[0]), (arch.groups[2:], shares[1])):
        value = ranks.sum_float(share.total, what) / max(ranks.sum_count(share.tokens, what), 1)
        for name in (n for group in groups for n in group):
            if prefix + name in stats:
                stats[prefix + name]["update_share"] = value


def _solve_linear(layer, name, solve, source_tensors, hessian, consume_hessian=False,
                  scale=None, sample=None) -> tuple[SolvedLinear, dict]:
    """Quantize one Linear and put its dequantized weight in the layer; returns (the solve, its stats).
    With input scales, W s is solved (the Hessian is the scaled input's) and the layer gets Q / s.
    SAMPLE (input rows, under a size budget) gives the stats each format's per-token error.

    Under a size budget the layer goes on with the base format's weight: the activations that reach the
    next group and layer are the base's (quantize/mixed.py).

    A function of its own so that the float32 weight and dequantized copies die with it.
    """
    weight = _weight_as_read(layer, name, source_tensors, scale)
    solved = solve(weight, hessian, source_tensors.get(name + ".bias"), consume_hessian, sample)
    return solved, _put_in_layer(layer, name, solved, weight, hessian, scale)


def _solve_together(layer, names, settings, source_tensors, hessian, scale=None) -> list[tuple[SolvedLinear, dict]]:
    """_solve_linear for the Linears of one group at once (solve.solve_stacked); the Hessian is consumed."""
    weights = [_weight_as_read(layer, name, source_tensors, scale) for name in names]
    biases = [source_tensors.get(name + ".bias") for name in names]
    solved = solve_stacked(settings, weights, hessian, biases, consume_hessian=True)
    return [(one, _put_in_layer(layer, name, one, weight, None, scale))
            for name, one, weight in zip(names, solved, weights)]


def _weight_as_read(layer, name, source_tensors, scale=None) -> torch.Tensor:
    """The Linear's weight in the source dtype (bitsandbytes records it): where the layer computes in a copy of
    the tensor as read (the CPU, float32), that tensor itself; elsewhere the layer's weight cast back, lossless.
    With input scales: W s, in float32."""
    source, linear = source_tensors[name + ".weight"], layer.get_submodule(name)
    if scale is not None:
        return linear.weight.detach().float() * scale
    return source if source.device == linear.weight.device else linear.weight.detach().to(source.dtype)


def _put_in_layer(layer, name, solved: SolvedLinear, weight, hessian, scale=None) -> dict:
    """The solve's dequantized weight (over the input scales) into the layer's Linear; returns its stats, with
    the output error."""
    linear = layer.get_submodule(name)
    linear.weight.data = (solved.dequantized if scale is None else solved.dequantized / scale).to(linear.weight.dtype)
    stats = dict(solved.stats)
    if "error" not in stats:  # the solver left H untouched (RTN; NF4 where K is no multiple of its block size)
        stats["error"] = relative_output_error(weight, solved.dequantized, hessian)
    return stats
