"""What a quantized checkpoint depends on: the method and its parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

METHODS = ("gptq", "rtn", "nf4", "fp4")


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

    def is_skipped(self, module: str) -> bool:
        return self.skip is not None and re.search(self.skip, module) is not None

    def calibrated(self, has_calibration: bool) -> bool:
        """Whether the run collects Hessians: always for gptq; nf4/fp4 when given calibration;
        rtn when given calibration for its scale search (plain RTN ignores calibration)."""
        if self.method == "rtn":
            return has_calibration and self.scale_search
        return self.method == "gptq" or (self.method in ("nf4", "fp4") and has_calibration)

    def resolved(self, has_calibration: bool) -> QuantizeSettings:
        """The settings as the run applies them: no scale search where there is no Hessian to weigh it."""
        if self.scale_search and not self.calibrated(has_calibration):
            return replace(self, scale_search=False)
        return self
