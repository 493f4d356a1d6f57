"""What a quantized checkpoint depends on: the method and its parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass

METHODS = ("gptq", "rtn", "nf4", "fp4")


@dataclass(frozen=True)
class QuantizeSettings:
    """What the output depends on: the method and its parameters."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    true_sequential: bool = True
    double_quant: bool = True  # nf4/fp4
    skip: str | None = None  # regex of module names kept in 16-bit (nf4/fp4)

    def is_skipped(self, module: str) -> bool:
        return self.skip is not None and re.search(self.skip, module) is not None

    def calibrated(self, has_calibration: bool) -> bool:
        return self.method == "gptq" or (self.method in ("nf4", "fp4") and has_calibration)
