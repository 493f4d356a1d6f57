"""What a quantized checkpoint depends on: the method and its parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

METHODS = ("gptq", "rtn", "nf4", "fp4")
BITS = (2, 3, 4, 8)  # of the uniform grid (gptq, rtn); nf4/fp4 are 4-bit
GPTQ_FORMAT_METHODS = ("gptq", "rtn")  # written as GPTQ v1: packed integer codes on a uniform grid
BNB_METHODS = ("nf4", "fp4")  # written as bitsandbytes 4-bit


def bits_text() -> str:
    return ", ".join(map(str, BITS[:-1])) + f" or {BITS[-1]}"


def valid_group_size(group_size: int) -> bool:
    """-1 (one group over all input columns) or a positive number of columns."""
    return group_size == -1 or group_size >= 1


def uses_activations(method: str, calibrated: bool) -> bool:
    """Whether a run of METHOD collects Hessians from calibration activations (GPTQ always; NF4/FP4 when
    calibrated; RTN only for its scale search, which QuantizeSettings.calibrated decides)."""
    return method == "gptq" or (method in BNB_METHODS and calibrated)


@dataclass(frozen=True)
class QuantizeSettings:
    """What the output depends on: the method and its parameters."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    # gptq defaults: act-order with groups in place (desc_act false) and scale search measured best
    # (benchmarks/layer_errors.py, README "Which options").
    act_order: bool = True
    static_groups: bool = True
    scale_search: bool = True  # wherever there is a Hessian (see calibrated); plain RTN/NF4 have none
    damp: float = 0.01
    true_sequential: bool = True
    double_quant: bool = True  # nf4/fp4
    skip: str | None = None  # regex of module names kept in 16-bit (nf4/fp4)

    @property
    def gptq_format(self) -> bool:
        return self.method in GPTQ_FORMAT_METHODS

    def is_skipped(self, module: str) -> bool:
        return self.skip is not None and re.search(self.skip, module) is not None

    def calibrated(self, has_calibration: bool) -> bool:
        """Whether the run collects Hessians: always for gptq; nf4/fp4 when given calibration;
        rtn when given calibration for its scale search (plain RTN ignores calibration)."""
        if self.method == "rtn":
            return has_calibration and self.scale_search
        return uses_activations(self.method, has_calibration)

    def resolved(self, has_calibration: bool) -> QuantizeSettings:
        """The settings as the run applies them: no scale search where there is no Hessian to weigh it."""
        if self.scale_search and not self.calibrated(has_calibration):
            return replace(self, scale_search=False)
        return self
