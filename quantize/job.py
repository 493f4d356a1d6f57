"""One quantization run as the driver's stages see it: how to run, and what every stage reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.quantize.arch import Architecture
from lowbit.quantize.checkpoint import ModelSource, SafetensorsCheckpoint
from lowbit.quantize.settings import QuantizeSettings

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunOptions:
    """How to run: none of it changes the output."""

    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "2GB"
    offload: bool | None = None  # activations in host memory; None = decide from free GPU memory
    force: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False  # read pickled .bin weights (weights_only) when there are no safetensors
    revision: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class QuantizeJob:
    """The run's inputs, as resolved once by the driver, and where its progress and output go."""

    source: ModelSource
    config: dict  # config.json
    arch: Architecture
    reader: SafetensorsCheckpoint  # the source's tensors
    settings: QuantizeSettings  # as the run applies them (QuantizeSettings.resolved)
    options: RunOptions
    device: torch.device
    dtype: torch.dtype  # compute dtype
    windows: torch.Tensor | None  # calibration windows, when the run collects Hessians
    calibration_info: dict | None  # their provenance, for the manifest
    work: Path  # OUTPUT.partial: renamed to OUTPUT once complete
    progress: dict  # progress.json (quantize/progress.py); updated as layers are saved
    report: ProgressFn  # (stage, done, total)

    @property
    def progress_dir(self) -> Path:
        return self.work / ".lowbit-progress"
