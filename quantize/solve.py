"""One Linear's solve: the chosen method's solver, the Hessian it weighs errors by, the error it reports.

The driver hands each Linear (weight, Hessian or None, bias) to `make_solver(settings)`'s function and
writes the tensors it returns; the format's own module makes them (pack.py: GPTQ v1; nf4.py: bitsandbytes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from lowbit.quantize.arch import Linear
from lowbit.quantize.gptq import GPTQConfig, GPTQStats, gptq_quantize_each, gptq_quantize_stacked, rtn_quantize
from lowbit.quantize.mixed import base_format, candidate_formats
from lowbit.quantize.nf4 import BnbConfig, quantize_bnb
from lowbit.quantize.pack import LinearFormat, pack_gptq_v1
from lowbit.quantize.settings import Method, QuantizeSettings


@dataclass
class SolvedLinear:
    tensors: dict[str, torch.Tensor]  # names relative to the module, as written to disk
    dequantized: torch.Tensor  # [N, K] float32, what a loader will compute
    stats: dict = field(default_factory=dict)
    # under a size budget: the other quantized formats this Linear may get, each with its tensors and its
    # relative output error (the unquantized one needs neither: the source has it, its error is 0)
    candidates: dict[LinearFormat, tuple[dict[str, torch.Tensor], float]] = field(default_factory=dict)


def make_solver(settings: QuantizeSettings) -> Callable[..., SolvedLinear]:
    """One function (weight, hessian or None, bias or None, consume_hessian, sample) -> what to write, for the
    chosen method.

    consume_hessian: the solver may work in the Hessian's buffer (one K x K matrix, not two); the caller
    must not use it afterwards. The stats then carry the output error, which needs H.
    sample: input rows [T, K] (HessianAccumulator's sample, under a size budget); the stats then carry
    "token_errors", each format's relative_token_error by tag (the base's and every candidate's).
    """
    if settings.gptq_format:
        config = GPTQConfig.from_settings(settings)

        def solve_uniform(weight, hessian, bias, consume_hessian=False, sample=None):
            configs = [config]
            if settings.target_bpw is not None:
                formats = candidate_formats(settings.bits, settings.group_size, *weight.shape)
                configs += [replace(config, bits=f.bits, group_size=f.group_size) for f in formats[1:] if f.quantized]
            if settings.method == "rtn" or hessian is None:  # RTN leaves the Hessian as it is
                importance = None if hessian is None else hessian.diagonal()
                results = [(rtn_quantize(weight, c, importance), None) for c in configs]
            else:  # one factor of H, one sweep per format
                results = gptq_quantize_each(weight, hessian, configs, consume_hessian)
            (q, base_stats), others = results[0], results[1:]
            stats = {} if base_stats is None else _stats_of(base_stats)
            candidates = {}
            dequantized = q.dequantize()
            if sample is not None:  # one float32 copy of W (none where it is float32) for every format's error
                weight32 = weight.float()
                energy = token_energy(weight32, sample)
                stats["token_errors"] = {base_format(settings).tag: relative_token_error(weight32, dequantized, sample,
                                                                                         energy)}
            for c, (cq, cstats) in zip(configs[1:], others):
                fmt, cdequantized = LinearFormat(c.bits, c.group_size), cq.dequantize()
                error = cstats.error if cstats is not None else relative_output_error(weight, cdequantized, hessian)
                candidates[fmt] = (pack_gptq_v1(cq, bias), error)
                if sample is not None:
                    stats["token_errors"][fmt.tag] = relative_token_error(weight32, cdequantized, sample, energy)
                del cdequantized
            return SolvedLinear(pack_gptq_v1(q, bias), dequantized, stats, candidates)

        return solve_uniform

    bnb = BnbConfig.from_settings(settings)

    def solve_bnb(weight, hessian, bias, consume_hessian=False, sample=None):
        tensors, dequantized, stats = quantize_bnb(weight, bnb, hessian, consume_hessian)
        if bias is not None:
            tensors["bias"] = bias
        if sample is not None:
            stats["token_errors"] = {base_format(settings).tag: relative_token_error(weight, dequantized, sample)}
        return SolvedLinear(tensors, dequantized, stats)

    return solve_bnb


def _stats_of(stats: GPTQStats) -> dict:
    return {"error": stats.error, "damp": stats.damp, "dead_inputs": stats.dead_inputs,
            "output_energy": stats.output_energy}


def solved_together(shapes: list[tuple[int, int]], layer_shapes: list[tuple[int, int]],
                    settings: QuantizeSettings) -> bool:
    """Whether GPTQ solves the Linears [N_i, K] of one projection group as one (solve_stacked).

    Only where the stacked solve holds no more than the layer's largest solve of one Linear does, its float32
    rows and its K x K Hessian (sum N_i K + K^2 against N K + K^2), so that no solve's peak grows: q/k/v, and
    an unfused gate/up beside a down_proj whose Hessian is intermediate^2 (Llama, Gemma, Qwen: one column
    loop where there were two); and not under a size budget, whose candidate formats are chosen Linear by Linear.
    """
    return (settings.method == Method.GPTQ and settings.target_bpw is None and len(shapes) > 1
            and sum(n * k for n, k in shapes) + shapes[0][1] ** 2 <= max(n * k + k * k for n, k in layer_shapes))


def solved_as(group: tuple[Linear, ...], layer: list[Linear], settings: QuantizeSettings) -> list[Linear]:
    """The solves of one group, as the plan counts them: its Linears one by one, or one of their stacked rows."""
    sizes = lambda linears: [(linear.out_features, linear.in_features) for linear in linears]  # noqa: E731
    if not solved_together(sizes(group), sizes(layer), settings):
        return list(group)
    return [Linear("+".join(linear.name for linear in group), sum(linear.out_features for linear in group),
                   group[0].in_features)]


def solve_stacked(settings: QuantizeSettings, weights: list[torch.Tensor], hessian: torch.Tensor,
                  biases: list[torch.Tensor | None], consume_hessian: bool = False) -> list[SolvedLinear]:
    """GPTQ for Linears that share their input, in one sweep (gptq.gptq_quantize_stacked): what make_solver's
    function gives each of them, bit for bit, with one column loop instead of one a Linear (q/k/v: about
    half their solve time on SmolLM2 and Gemma-3) and no copies of the shared Hessian."""
    (parts,) = gptq_quantize_stacked(weights, hessian, [GPTQConfig.from_settings(settings)], consume_hessian)
    return [SolvedLinear(pack_gptq_v1(q, bias), q.dequantize(), _stats_of(stats))
            for (q, stats), bias in zip(parts, biases)]


def relative_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor | None, max_rows: int = 512) -> float:
    """||(W - Q) X||^2 / ||W X||^2 through the Hessian (on a strided subset of rows, to stay cheap);
    without a Hessian, the plain relative weight error."""
    step = max(1, weight.shape[0] // max_rows)
    w = weight[::step].float()
    d = w - dequantized[::step].float()
    if hessian is None:
        return float((d * d).sum() / (w * w).sum().clamp_min(1e-30))
    return float(((d @ hessian) * d).sum() / ((w @ hessian) * w).sum().clamp_min(1e-30))


def relative_token_error(weight: torch.Tensor, dequantized: torch.Tensor, sample: torch.Tensor,
                         energy: torch.Tensor | None = None, chunk_rows: int = 512) -> float:
    """The mean over the sample's input rows x of ||(W - Q) x||^2 / ||W x||^2: each token's relative output error
    counts alike, where relative_output_error's sum over all tokens at once is set by the few tokens with
    massive activations (quantize/mixed.py). SAMPLE [T, K] may sit in host memory; it is moved to the
    weight's device CHUNK_ROWS rows at a time. ENERGY: token_energy(weight, sample), when several formats
    of one weight are scored."""
    w = weight.float()
    energy = token_energy(w, sample, chunk_rows) if energy is None else energy
    d = w - dequantized.to(w.device).float()
    total = 0.0
    for x, e in zip(sample.split(chunk_rows), energy.split(chunk_rows)):
        total += float(((x.to(w.device).float() @ d.T).square().sum(-1) / e.clamp_min(1e-30)).sum())
    return total / max(sample.shape[0], 1)


def token_energy(weight: torch.Tensor, sample: torch.Tensor, chunk_rows: int = 512) -> torch.Tensor:
    """||W x||^2 of every row x of SAMPLE [T, K], on the weight's device."""
    w = weight.float()
    return torch.cat([(x.to(w.device).float() @ w.T).square().sum(-1) for x in sample.split(chunk_rows)])


def first_row_weight(share: float, window_tokens: int) -> int:
    """How many rows a window's first position counts as in a Hessian, so that it makes up about SHARE of the
    window's rows (QuantizeSettings.first_position_share); at least one."""
    return max(1, round(share * window_tokens))


TOKEN_SAMPLE_ROWS = 4096  # a size budget's per-token errors: 8 windows of 512 (BENCHMARKS.md, "token errors")


class HessianAccumulator:
    """H = 2/n * sum(x^T x) over all input rows seen: a float32 sum, made the mean in its own buffer by `mean()`.

    H is symmetric, so `add` sums only its upper triangle, a band of rows at a time (each band from its
    diagonal block rightwards: one in-place addmm a band, no K x K temporary), and `mean()` mirrors it.
    At 3 bands or more that is 55-70 % of a full x^T x's products.

    Each window's first row can count more than once (first_row_weight): the first position is the attention
    sink that every later token reads, the same state in every window, and counted once its weight would
    shrink as the windows grow.

    Under torchrun each rank sums its own block of windows and the ranks' sums are added in rank order
    (quantize/shared_solves.py): the same products grouped otherwise, so N ranks differ from one process
    by float32 rounding. A float64 sum would make them agree to the byte, at 4 K^2 more bytes at the
    peak (Phi-4 on one GPU: 6.39 GiB allocated instead of 5.19; Llama-3.1-405B offloaded: 10.6 GiB more,
    past the 32 GiB it must fit): not worth it.
    """

    def __init__(self, columns: int, device: torch.device, sample_rows: int = 0, targets: torch.Tensor | None = None,
                 first_row_weight: int = 1):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0
        self.first_row_weight = first_row_weight  # each window's first row counts this many times (first_row_weight())
        self.bands = hessian_bands(columns)
        self.sample_rows = sample_rows  # the first input rows seen are also kept, in host memory (sample())
        self._sample: list[torch.Tensor] = []
        self._sampled = 0  # input rows seen, each once
        # the unquantized model's inputs of every window [windows, seqlen, K] (fp_targets.py): with them the
        # cross sum (x - x~)^T x~ is kept too, a full K x K (it is not symmetric)
        self.targets = targets
        self.cross = None if targets is None else torch.zeros(columns, columns, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, window: int = 0) -> None:
        """Add one window's inputs x [tokens, K] (window: its index, which pairs it with its targets)."""
        x = x.float()
        extra = self.first_row_weight - 1
        # v^T v by the same kernel as the rest: each diagonal block stays symmetric
        first = x[:1] * extra**0.5 if extra else None
        for start, end in self.bands:
            self.sum[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])
            if first is not None:
                self.sum[start:end, start:].addmm_(first[:, start:end].T, first[:, start:])
        if self.cross is not None:
            target = self.targets[window].to(x.device, torch.float32, copy=True).reshape(x.shape)
            target.sub_(x)
            self.cross.addmm_(target.T, x)
            if extra:
                self.cross.addmm_(target[:1].T, x[:1], alpha=extra)
            del target
        wanted = self.sample_rows - self._sampled
        if wanted > 0:
            self._sample.append(x[:wanted].to("cpu", copy=True))
        self._sampled += x.shape[0]
        self.rows += x.shape[0] + extra

    def sample(self) -> torch.Tensor | None:
        """The first sample_rows input rows (fewer where fewer were seen) [T, K], float32 on the host; None
        without a sample."""
        return torch.cat(self._sample) if self._sample else None

    def mean(self) -> torch.Tensor:
        """The float32 Hessian, in the sum's own buffer (the sum is gone after)."""
        mean, self.sum = self.sum, None
        for start, end in self.bands:  # the lower triangle from the upper, one band's columns at a time
            mean[end:, start:end].copy_(mean[start:end, end:].T)
        return mean.mul_(2 / self.rows)

    def cross_mean(self) -> torch.Tensor | None:
        """2/n * sum((x - x~)^T x~), on the Hessian's scale, in the cross sum's own buffer; None without targets."""
        cross, self.cross = self.cross, None
        return None if cross is None else cross.mul_(2 / self.rows)


HESSIAN_BAND = 256  # measured on the CPU (576-2048 columns): wider bands save fewer products, narrower make small GEMMs


def hessian_bands(columns: int) -> list[tuple[int, int]]:
    """[start, end) of about equal bands of at most HESSIAN_BAND columns, their widths multiples of 32."""
    count = -(-columns // HESSIAN_BAND)
    return row_bands(columns, 1, -(-columns // count // 32) * 32)


def row_bands(rows: int, row_bytes: int, band_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of rows, each at most band_bytes (at least one row)."""
    step = max(1, band_bytes // row_bytes)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]
