"""Refuse a checkpoint before quantizing anything: every Linear present, each shape fit for the packing,
the group size and the size budget."""

from __future__ import annotations

from lowbit.errors import UsageError
from lowbit.quantize.arch import Architecture
from lowbit.quantize.checkpoint import SafetensorsCheckpoint
from lowbit.quantize.mixed import check_target
from lowbit.quantize.settings import QuantizeSettings


def check_shapes(arch: Architecture, reader: SafetensorsCheckpoint, settings: QuantizeSettings) -> None:
    """Every Linear must exist, and its shape must fit the packing and the group size (and the budget)."""
    shapes = []
    for i in range(arch.num_layers):
        for name in arch.linear_names():
            full = arch.layer_prefix(i) + name + ".weight"
            if full not in reader:
                raise UsageError(f"checkpoint lacks {full} (is it a complete {arch.name} checkpoint?)")
            n, k = reader.info(full).shape
            shapes.append((n, k))
            if not settings.gptq_format:
                continue
            if settings.group_size > 0 and k % settings.group_size:
                raise UsageError(f"group size {settings.group_size} does not divide in_features {k} of "
                                 f"{full[:-7]} (choose a group size that divides it, or -1)")
            if (k * settings.bits) % 32 or (n * settings.bits) % 32:
                raise UsageError(f"{full[:-7]} is {n}x{k}: {settings.bits}-bit GPTQ packing needs both "
                                 f"dimensions to fill whole 32-bit words")
    if settings.target_bpw is not None:
        check_target(shapes, settings.bits, settings.group_size, settings.target_bpw)
