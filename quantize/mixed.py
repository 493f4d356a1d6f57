"""A size budget instead of one bit width: which format each decoder Linear gets under `--target-bpw`.

Each Linear is solved once per candidate format inside the ordinary layer loop (solve.py asks
`candidate_formats`; gptq.gptq_quantize_each sweeps them all against one factor of the Hessian), and
each candidate's relative output error is kept with its tensors in the progress folder. Once every layer
is scored, `choose` spends the budget over the whole model at once.

The error is taken per token, ||(W - Q) x||^2 / ||W x||^2 averaged over the first 4096 calibration tokens
that the group's Hessian sees (solve.relative_token_error, solve.TOKEN_SAMPLE_ROWS), not over all tokens at
once: there a few tokens with massive activations set ||W X||^2 (SmolLM2's down_proj from layer 12 on), and
an upgrade's score says little about the other tokens. Measured on both test models, the per-token
choice beat the all-token one on delta and KLD at +0.25 bits per weight (BENCHMARKS.md, "token errors").

The activations that move on to the next group and layer are those of the base format (the uniform
setting): the scores of later Linears assume their inputs carry the base's error, which a richer choice
only lowers.

A unit of choice is one projection group of one layer (q/k/v, o, gate/up, down): its Linears share an
input, and vLLM fuses q/k/v and gate/up into one Linear that must have one format (pack.VLLM_FUSED_NAMES).

How errors are weighed (`error_weight`): "weights", the default, counts each Linear's relative output
error ||(W - Q) X||^2 / ||W X||^2 times its number of weights. Bytes grow with the number of weights too,
so the greedy ranks every upgrade by the relative error it cuts per extra bit per weight, the same way
for Gemma-3-270M's k_proj [256, 640] as for its down_proj [640, 2048]. "relative" sums the relative
errors as they are, which makes a small Linear's upgrade look many times cheaper a unit of error, and
the greedy buys q/k/v first. "update" weighs the relative error by its sublayer's share of the residual
stream (steps.UpdateShare: the mean over tokens of ||u||^2 / ||h + u||^2), which puts the budget into the
first layers. All three come from the layer loop (no second pass).

Measured side by side (BENCHMARKS.md, "mixed-weights" and "The size budget's weighting by weights"): on
Gemma-3-270M, whose weights lie on no grid, "weights" spends +0.25 bits per weight on 4-bit at groups of 64
and 32 nearly everywhere and cuts the perplexity delta and the KLD far more than "update", which lost even
to every Linear at group size 64 (a smaller checkpoint). On SmolLM2, whose weights sit on a 4-bit grid with
blocks of 32, finer groups buy little and "update"'s few 8-bit Linears do better. The default follows the
model that is not on a grid, as users' models are not. An earlier "residual" weighting divided the absolute
error by the stream's mean energy; it lost to relative on every budget, because a few tokens with massive
activations (1e6 times the others' energy in SmolLM2 from layer 12 on) set that mean.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from lowbit.errors import UsageError
from lowbit.quantize.nf4 import BLOCKSIZE as BNB_BLOCKSIZE
from lowbit.quantize.nf4 import linear_bytes as bnb_linear_bytes
from lowbit.quantize.pack import UNQUANTIZED, LinearFormat, linear_bytes
from lowbit.quantize.settings import QuantizeSettings

FINER_GROUPS = (64, 32)  # the 4-bit candidates' group sizes where the base's is coarser (Marlin runs both)


def candidate_formats(bits: int, group_size: int, n: int, k: int) -> list[LinearFormat]:
    """The formats a Linear [N, K] may get, the base (the uniform setting) first: 4-bit at each finer group
    size, 8-bit at the base group size, and unquantized. Only those that cost more than the base and
    that pack (whole 32-bit words, a group size dividing K); all inside what Marlin runs when the base is."""
    base = LinearFormat(bits, group_size)
    finer = [LinearFormat(4, size) for size in FINER_GROUPS if group_size == -1 or group_size > size]
    options = [base, *finer, LinearFormat(8, group_size), UNQUANTIZED]
    base_bytes = format_bytes(base, n, k, 2)
    chosen = [base]
    for fmt in options[1:]:
        if fmt not in chosen and packs(fmt, n, k) and format_bytes(fmt, n, k, 2) > base_bytes:
            chosen.append(fmt)
    return chosen


def swept_formats(settings: QuantizeSettings, n: int, k: int) -> list[LinearFormat]:
    """The quantized formats the solver sweeps a Linear [N, K] for: the base, and under a size budget its
    other quantized candidates (GPTQ format only; the unquantized one needs no sweep)."""
    if settings.target_bpw is None or not settings.gptq_format:
        return [base_format(settings)]
    return [f for f in candidate_formats(settings.bits, settings.group_size, n, k) if f.quantized]


def kept_candidate_bytes(settings: QuantizeSettings, n: int, k: int) -> int:
    """The packed tensors of a Linear's other candidates, kept until its layer is saved (the plan's term)."""
    return sum(format_bytes(f, n, k, 2) for f in swept_formats(settings, n, k)[1:])


def packs(fmt: LinearFormat, n: int, k: int) -> bool:
    if not fmt.quantized:
        return True
    group_ok = fmt.group_size == -1 or k % fmt.group_size == 0
    return group_ok and (k * fmt.bits) % 32 == 0 and (n * fmt.bits) % 32 == 0


def format_bytes(fmt: LinearFormat, n: int, k: int, dense_bytes: int) -> int:
    """Bytes on disk of a Linear [N, K] in fmt (bias aside, as bits_per_weight counts): qweight, qzeros,
    scales and g_idx (pack.py), or the weight itself at dense_bytes a value."""
    return linear_bytes(n, k, fmt.bits, fmt.group_size) if fmt.quantized else n * k * dense_bytes


@dataclass(frozen=True)
class Option:
    fmt: LinearFormat
    bytes: int  # of the whole unit
    error: float  # of the whole unit: the sum of its Linears' relative output errors


@dataclass(frozen=True)
class Unit:
    """One choice: the Linears of one projection group of one layer, and what each format costs and loses."""

    modules: tuple[str, ...]  # full names
    options: tuple[Option, ...]  # the base first


def budget_bytes(target_bpw: float, weights: int) -> int:
    return int(target_bpw * weights // 8)


def choose(units: list[Unit], budget: int) -> list[Option]:
    """Per unit, the option that minimises the total error with the total bytes at most `budget`.

    Greedy on each unit's lower convex hull of (bytes, error): every step is the upgrade that removes the
    most error per extra byte, over all units, while it fits. Why that is good enough: hull steps come in
    decreasing error-per-byte within a unit, so the greedy's steps before the first that does not fit are
    exactly the optimum of the linear relaxation of this multiple-choice knapsack, less a fraction of that
    one step. The exact optimum is never better than the relaxation, so the greedy is within one step's
    gain of it (tests/test_mixed.py checks this bound against an exact solution), and the gain of one step
    is one Linear group's error out of hundreds. After a step that does not fit, the greedy goes on with
    smaller ones, which only narrows the gap.
    """
    chosen = [0] * len(units)
    left = budget - sum(unit.options[0].bytes for unit in units)
    if left < 0:
        raise ValueError("the base options do not fit the budget")
    heap = []
    for index, unit in enumerate(units):
        _push_step(heap, index, unit, 0, left)
    while heap:
        _, index, target = heapq.heappop(heap)
        unit, current = units[index], chosen[index]
        extra = unit.options[target].bytes - unit.options[current].bytes
        if extra > left:  # the budget shrank since this step was queued: the best step that fits now
            _push_step(heap, index, unit, current, left)
            continue
        chosen[index], left = target, left - extra
        _push_step(heap, index, unit, target, left)
    return [unit.options[i] for unit, i in zip(units, chosen)]


def _push_step(heap: list, index: int, unit: Unit, current: int, left: int) -> None:
    """Queue the unit's best upgrade from option `current` that fits in `left` bytes: the steepest error
    drop per byte (ties: the larger step, so that hull vertices are not skipped one at a time)."""
    here = unit.options[current]
    best = None
    for target, option in enumerate(unit.options):
        extra = option.bytes - here.bytes
        if extra <= 0 or extra > left or option.error >= here.error:
            continue
        key = ((here.error - option.error) / extra, extra)
        if best is None or key > best[0]:
            best = (key, target)
    if best is not None:
        heapq.heappush(heap, (-best[0][0], index, best[1]))


def total(options: list[Option]) -> tuple[int, float]:
    """(bytes, error) of a choice."""
    return sum(o.bytes for o in options), sum(o.error for o in options)


@dataclass(frozen=True)
class LinearScore:
    """What the layer loop measured of one Linear: each format's bytes on disk and (weighted) error."""

    bytes: dict[LinearFormat, int]
    errors: dict[LinearFormat, float]  # the base's and every quantized candidate's; unquantized is 0


WEIGHTINGS = ("weights", "relative", "update")
DEFAULT_WEIGHTING = "weights"  # measured against the other two: see the module docstring


def error_weight(stats: dict, weighting: str, weights: int) -> float:
    """What one unit of a Linear's relative output error counts for in the total (see the module's docstring).

    weights: the Linear's number of weights (WEIGHTS), so that the greedy ranks each upgrade by the relative
    error it cuts per extra bit per weight, whatever the Linear's size. relative: 1, every Linear alike.
    update: its sublayer's share of the residual stream, which the layer loop's stepwise passes measure
    (driver: _record_update_shares); a run without them (RTN, plain NF4, a layer whose layout the steps do
    not describe) counts every Linear alike."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    if weighting == "weights":
        return float(weights)
    if weighting == "relative":
        return 1.0
    return stats.get("update_share", 1.0)


def base_format(settings: QuantizeSettings) -> LinearFormat:
    """The uniform setting's format: GPTQ's bits and group size, or bitsandbytes 4-bit in its blocks."""
    return LinearFormat(settings.bits, settings.group_size) if settings.gptq_format else LinearFormat(4, BNB_BLOCKSIZE)


def unit_formats(settings: QuantizeSettings, n: int, k: int) -> list[LinearFormat]:
    """The formats a Linear [N, K] may get under a budget, the base first. GPTQ: candidate_formats;
    bitsandbytes (NF4/FP4): 4-bit or left unquantized (llm_int8_skip_modules)."""
    if settings.gptq_format:
        return candidate_formats(settings.bits, settings.group_size, n, k)
    return [base_format(settings), UNQUANTIZED]


def linear_cost(settings: QuantizeSettings, fmt: LinearFormat, n: int, k: int, dense_bytes: int) -> int:
    """Bytes on disk of a Linear [N, K] in fmt under these settings (bias aside, as bits_per_weight counts)."""
    if fmt.quantized and not settings.gptq_format:
        return bnb_linear_bytes(n, k, settings.double_quant)
    return format_bytes(fmt, n, k, dense_bytes)


def score_of(settings: QuantizeSettings, n: int, k: int, dense_bytes: int, stats: dict,
             weighting: str = DEFAULT_WEIGHTING) -> LinearScore:
    """A Linear's score from its entry in progress.json, each error weighted by error_weight: the per-token
    errors ("token_errors": {tag: error}, the base's and every candidate's) where the loop measured them, else
    the errors over all tokens at once ("error", and "candidates": {tag: error} for the other quantized formats:
    a progress folder from before per-token errors)."""
    weight = error_weight(stats, weighting, n * k)
    formats = unit_formats(settings, n, k)
    measured = stats.get("token_errors")
    if measured is None:
        measured = {formats[0].tag: stats["error"], **stats.get("candidates", {})}
    errors = {formats[0]: weight * measured[formats[0].tag], UNQUANTIZED: 0.0}
    for fmt in formats[1:]:
        if fmt.quantized:
            errors[fmt] = weight * measured[fmt.tag]
    return LinearScore({fmt: linear_cost(settings, fmt, n, k, dense_bytes) for fmt in errors}, errors)


def unit_of(modules: tuple[str, ...], scores: list[LinearScore], base: LinearFormat) -> Unit:
    """One unit's options: the formats all its Linears can take (the base first), bytes and errors summed."""
    common = [fmt for fmt in scores[0].errors if all(fmt in s.errors for s in scores)]
    common.sort(key=lambda fmt: fmt != base)
    options = tuple(Option(fmt, sum(s.bytes[fmt] for s in scores), sum(s.errors[fmt] for s in scores))
                    for fmt in common)
    return Unit(modules, options)


def check_target(shapes: list[tuple[int, int]], settings: QuantizeSettings) -> None:
    """Before a run: the uniform setting must fit the budget (g_idx, or bitsandbytes' absmax, make it cost
    a little over nominal)."""
    weights = sum(n * k for n, k in shapes)
    base = sum(linear_cost(settings, base_format(settings), n, k, 2) for n, k in shapes)
    if base > budget_bytes(settings.target_bpw, weights):
        what = (f"{settings.bits}-bit, group size {settings.group_size}" if settings.gptq_format
                else settings.method.value)
        extra = "g_idx" if settings.gptq_format else "absmax"
        raise UsageError(f"--target-bpw {settings.target_bpw:g} is below what {what} costs on this model "
                         f"({8 * base / weights:.4f} bits per weight, {extra} included): ask for more")
