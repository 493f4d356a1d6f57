"""What a quantized checkpoint depends on: the method and its parameters, and the rules they must keep.

Every rule is written here once: QuantizeSettings checks itself when it is made, and the solver and plan
configs derived from it (GPTQConfig, BnbConfig, PlanSettings) apply the same functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum

from lowbit.errors import UsageError


class Method(StrEnum):
    GPTQ = "gptq"
    RTN = "rtn"  # round to nearest on GPTQ's grid: the baseline
    NF4 = "nf4"
    FP4 = "fp4"

    @property
    def gptq_format(self) -> bool:
        """Written as GPTQ v1 (packed integer codes on a uniform grid); the others as bitsandbytes 4-bit."""
        return self in (Method.GPTQ, Method.RTN)


METHODS = tuple(m.value for m in Method)
BITS = (2, 3, 4, 8)  # of the uniform grid (gptq, rtn); nf4/fp4 are 4-bit
GPTQ_FORMAT_METHODS = tuple(m.value for m in Method if m.gptq_format)
BNB_METHODS = tuple(m.value for m in Method if not m.gptq_format)


class InvalidSetting(UsageError):
    """One setting breaks its rule; `name` is the field, so the CLI and the recipe can point at their own key."""

    def __init__(self, name: str, rule: str):
        self.name, self.rule = name, rule
        super().__init__(f"{name} {rule}")


def bits_text() -> str:
    return ", ".join(map(str, BITS[:-1])) + f" or {BITS[-1]}"


def check_method(method: str) -> Method:
    try:
        return Method(method)
    except ValueError:
        raise InvalidSetting("method", f"must be one of {', '.join(METHODS)}, not {method!r}") from None


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise InvalidSetting("bits", f"must be {bits_text()}, not {bits}")


def default_sym(bits: int) -> bool:
    """Symmetric where vLLM can load the checkpoint (4 and 8 bits), asymmetric below."""
    return bits >= 4


def check_group_size(group_size: int) -> None:
    """-1 (one group over all input columns) or a positive number of columns."""
    if not (group_size == -1 or group_size >= 1):
        raise InvalidSetting("group_size", f"must be -1 or positive, not {group_size}")


def check_fraction(name: str, value: float) -> None:
    """A share of something: at least 0 and below 1."""
    if not 0 <= value < 1:
        raise InvalidSetting(name, f"must be at least 0 and below 1, not {value}")


def check_damp(damp: float) -> None:
    """A fraction of the mean Hessian diagonal added to the diagonal."""
    check_fraction("damp", damp)


def nominal_bits_per_weight(bits: int, group_size: int) -> float:
    """Bits per weight of a uniform GPTQ Linear, shape aside: codes, plus each group's zero point (bits) and
    float16 scale. The exact figure (quantize/pack.py: linear_bytes) adds g_idx, 32 bits per input column."""
    return bits + (0 if group_size == -1 else (bits + 16) / group_size)


def nominal_bnb_bits_per_weight(double_quant: bool) -> float:
    """Bits per weight of a bitsandbytes 4-bit Linear: codes plus one absmax per block of 64 values (a uint8
    with double quantization, else a float32); the nested scales and the quant state add a little."""
    return 4 + (8 if double_quant else 32) / 64


def check_target_bpw(target_bpw: float | None, method: Method, bits: int, group_size: int,
                     double_quant: bool = True) -> None:
    """A size budget (quantize/mixed.py) is spent above what the uniform setting costs: on GPTQ-format
    choices (bits, group size, 16-bit), or for NF4/FP4 on Linears left in 16 bits."""
    if target_bpw is None:
        return
    if method.gptq_format:
        uniform, what = nominal_bits_per_weight(bits, group_size), f"{bits}-bit, group size {group_size}"
    else:
        uniform, what = nominal_bnb_bits_per_weight(double_quant), method.value
    if not uniform < target_bpw <= 16:
        raise InvalidSetting("target_bpw", f"must be above {uniform:.4g} (what {what} costs) and at most 16, "
                                           f"not {target_bpw:g}")


def uses_activations(method: str, calibrated: bool) -> bool:
    """Whether a run of METHOD collects Hessians from calibration activations (GPTQ always; NF4/FP4 when
    calibrated; RTN only for its scale search, which QuantizeSettings.calibrated decides)."""
    return method == Method.GPTQ or (method in BNB_METHODS and calibrated)


@dataclass(frozen=True)
class QuantizeSettings:
    """What the output depends on: the method and its parameters."""

    method: Method = Method.GPTQ
    bits: int = 4
    group_size: int = 128
    # None: symmetric at 4 and 8 bits (the only GPTQ codes vLLM loads, pack.VLLM_GPTQ_CODES), asymmetric
    # below, where vLLM loads no GPTQ checkpoint and a zero point per group measured far better (BENCHMARKS.md,
    # "quality3-gemma3-asym", "quality3-smollm2-asym"); GPTQ v1 stores a zero point either way.
    sym: bool | None = None
    # gptq defaults: act-order with groups in place (desc_act false) and scale search measured best
    # (benchmarks/layer_errors.py, README "Which options").
    act_order: bool = True
    static_groups: bool = True
    scale_search: bool = True  # wherever there is a Hessian (see calibrated); plain RTN/NF4 have none
    # AWQ's input scales folded into the producers (quantize/input_scales.py): GPTQ format, with a Hessian
    # (under a size budget too: every candidate is solved on the scaled weights).
    # None: wherever they apply and measured better, 4 bits and more (at 3 bits they lost on both test models:
    # BENCHMARKS.md, "quality3-gemma3-awq", "quality3-smollm2-awq"); True where they cannot apply is refused.
    awq_scales: bool | None = None
    damp: float = 0.01
    # the share of each calibration window's rows that its first position (the attention sink: Gemma's BOS, any
    # model's first token) makes up in every Hessian, counted at least once (solve.first_row_weight): at 1/128, 16
    # times in a 2048-token window, 4 in a 512-token one. Counted once, its weight shrank as windows grew, and
    # 2048-token windows scored far worse on Gemma-3 (BENCHMARKS.md, "first-position-notes"). 0: once.
    first_position_share: float = 1 / 128
    true_sequential: bool = True
    # each Linear fit towards the unquantized model's outputs as well as its own quantized inputs (GPTAQ:
    # quantize/fp_targets.py), for the Hessian-based methods (gptq, calibrated nf4/fp4). None: GPTQ below
    # 4 bits, where it cut the perplexity delta by a quarter to a third on both test models, and calibrated
    # nf4/fp4 (one sweep; measured on NF4: 0.58x and 0.87x over two samples, "quality-nf4-fp-targets"); for
    # GPTQ at 4 bits it moved the delta by about the noise of a calibration sample, for ~1.6x the time
    # (BENCHMARKS.md, "fp-targets-notes")
    fp_targets: bool | None = None
    # float32 window passes and Hessian sums with bfloat16 operands where the hardware has such a path (oneDNN
    # on AMX/AVX512-BF16 CPUs; TF32 on GPUs), the solver exact: 3-5x faster products on an AMX CPU, quality
    # within noise; elsewhere the same bits (BENCHMARKS.md, "fast-matmul")
    fast_matmul: bool = True
    double_quant: bool = True  # nf4/fp4
    skip: str | None = None  # regex of module names kept in 16-bit (nf4/fp4)
    target_bpw: float | None = None  # a size budget: bits per decoder-Linear weight, spent where it helps most

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", check_method(self.method))
        check_bits(self.bits)
        if self.sym is None:
            object.__setattr__(self, "sym", default_sym(self.bits))
        check_group_size(self.group_size)
        check_damp(self.damp)
        check_fraction("first_position_share", self.first_position_share)
        check_target_bpw(self.target_bpw, self.method, self.bits, self.group_size, self.double_quant)
        if self.awq_scales and not self.awq_scales_apply:
            raise InvalidSetting("awq_scales", "applies to the GPTQ format (gptq, rtn) only")
        if self.fp_targets and self.method == Method.RTN:
            raise InvalidSetting("fp_targets", "applies to gptq and calibrated nf4/fp4, not to rtn")
        if self.target_bpw is not None and self.skip is not None:
            raise InvalidSetting("skip", "cannot be combined with target_bpw, which chooses the 16-bit modules itself")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as e:
                raise InvalidSetting("skip", f"is not a regular expression: {e}") from None

    @property
    def gptq_format(self) -> bool:
        return self.method.gptq_format

    def is_skipped(self, module: str) -> bool:
        return self.skip is not None and re.search(self.skip, module) is not None

    def calibrated(self, has_calibration: bool) -> bool:
        """Whether the run collects Hessians: always for gptq; nf4/fp4 when given calibration;
        rtn when given calibration for its scale search (plain RTN ignores calibration)."""
        if self.method == Method.RTN:
            return has_calibration and self.scale_search
        return uses_activations(self.method, has_calibration)

    def resolved(self, has_calibration: bool) -> QuantizeSettings:
        """The settings as the run applies them: no scale search where there is no Hessian to weigh it, input
        scales only where awq_scales says they apply, and fp targets only where there are calibration windows."""
        resolved = self
        if self.scale_search and not self.calibrated(has_calibration):
            resolved = replace(resolved, scale_search=False)
        wanted = self.awq_scales if self.awq_scales is not None else self.bits >= 4
        applies = wanted and self.awq_scales_apply and resolved.calibrated(has_calibration)
        by_default = self.method in BNB_METHODS or (self.method == Method.GPTQ and self.bits < 4)
        wanted = self.fp_targets if self.fp_targets is not None else by_default
        fp_targets = wanted and resolved.calibrated(has_calibration)
        return replace(resolved, awq_scales=applies, fp_targets=fp_targets)

    @property
    def awq_scales_apply(self) -> bool:
        """Whether input scales can be folded: the GPTQ format."""
        return self.gptq_format
