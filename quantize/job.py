"""One quantization run as the driver's stages see it: how to run, what every stage reads, and opening it
(the source resolved and checked, the calibration windows drawn, OUTPUT.partial's progress opened)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lowbit.errors import LowbitError, UsageError
from lowbit.quantize.arch import Architecture, architecture_of
from lowbit.quantize.distributed import SINGLE, RankFailed, Ranks, rank_device
from lowbit.quantize.checkpoint import (
    ModelSource,
    SafetensorsCheckpoint,
    check_remote_code,
    load_config_dict,
    open_checkpoint,
    resolve_model,
)
from lowbit.quantize.fit import HOST_SHARE, fp_targets_fit_host, host_memory_bytes
from lowbit.quantize.mixed import check_target
from lowbit.quantize.plan import PlanSettings
from lowbit.quantize.progress import open_progress, progress_fingerprint
from lowbit.quantize.settings import QuantizeSettings
from lowbit.quantize.stream import pick_device, pick_dtype
from lowbit.quantize.writer import check_output_free, disk_full_error

log = logging.getLogger("lowbit")

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


def open_job(model: str, output: Path, settings: QuantizeSettings, calibration=None,
             options: RunOptions = RunOptions(), on_progress: ProgressFn | None = None,
             ranks: Ranks = SINGLE) -> QuantizeJob:
    """Resolve the source, check it, draw the calibration windows and open (or resume) OUTPUT.partial's progress.
    Under torchrun rank 0 alone opens the progress; the others hear where it stands."""
    report = on_progress or (lambda stage, done, total: None)
    if settings.method == "gptq" and calibration is None:
        raise UsageError("gptq needs calibration data (--calibration)")
    if ranks.primary:
        check_output_free(output, options.force)
    source = resolve_model(model, options.revision, options.token)
    config = load_config_dict(source.folder)
    architecture_of(config)  # refuse an unsupported model before opening its weights
    check_remote_code(config, source.name, options.trust_remote_code)
    reader = open_checkpoint(source.folder, options.allow_pickle)
    arch = architecture_of(config, reader.names())
    check_shapes(arch, reader, settings)
    device = rank_device(pick_device(options.device))
    dtype = pick_dtype(options.dtype, device, config.get("torch_dtype") or config.get("dtype"))

    requested, settings = settings, settings.resolved(calibration is not None)
    windows, calibration_info = None, None
    if settings.calibrated(calibration is not None):
        windows, calibration_info = _calibration_windows(source, calibration, options)
        ranks.windows(windows.shape[0])  # refuses fewer windows than ranks
        if settings.fp_targets and requested.fp_targets is None:
            if ranks.primary:  # ranks share a host: rank 0 plans for all the windows, the others hear its choice
                settings = _default_fp_targets_within_host(settings, config, windows, device, dtype, options)
            settings = replace(settings, fp_targets=ranks.from_primary(settings.fp_targets))

    work = output.with_name(output.name + ".partial")
    fingerprint = progress_fingerprint(settings, reader, config, calibration_info)
    progress = open_progress(work, work / ".lowbit-progress", fingerprint, options.force) if ranks.primary else {}
    progress["layers_done"] = ranks.from_primary(progress.get("layers_done"))
    return QuantizeJob(source, config, arch, reader, settings, options, device, dtype, windows, calibration_info,
                       work, progress, report)


@contextmanager
def cleanup_on_bad_input(job: QuantizeJob):
    """A full disk, or bad input found part-way (a NaN weight, say), removes OUTPUT.partial: fixing the input
    makes this progress stale anyway. A crash or a kill keeps it for the next run to resume."""
    try:
        yield
    except RankFailed:
        raise  # another rank stopped: the progress stays, for the next run to resume
    except OSError as e:
        error = disk_full_error(e, job.work, job.reader.total_bytes())
        if error is None:
            raise
        shutil.rmtree(job.work, ignore_errors=True)
        raise error from None
    except LowbitError:
        shutil.rmtree(job.work, ignore_errors=True)
        raise


def _default_fp_targets_within_host(settings: QuantizeSettings, config: dict, windows: torch.Tensor,
                                    device: torch.device, dtype: torch.dtype, options: RunOptions) -> QuantizeSettings:
    """fp targets, on by default, turned off (with a warning) where what they keep in host memory, the unquantized
    hidden states and each group's inputs, would take the run past HOST_SHARE of the host's memory; --fp-targets
    keeps them on whatever the plan says. Decided from what does not change between a run and its resumption
    (the host's physical memory, the settings, the windows), so that a resumed run's settings match."""
    total = host_memory_bytes()
    # on a GPU with the offload left to the run, as if offloaded (activations in host memory, the most the host
    # holds): free GPU memory, which decides that, may differ when the run is resumed, and this choice must not
    offload = options.offload if options.offload is not None else device.type == "cuda"
    plan = PlanSettings(quantize=settings, nsamples=windows.shape[0], seqlen=windows.shape[1], device=device.type,
                        compute_bytes=dtype.itemsize, offload=offload)
    if total is None or fp_targets_fit_host(config, plan, int(total * HOST_SHARE)):
        return settings
    log.warning("fit towards the unquantized outputs turned off: what it keeps would take the host past %.0f %% of "
                "its %.1f GiB (lowbit plan shows it; --fp-targets keeps it on)", 100 * HOST_SHARE, total / 2**30)
    return replace(settings, fp_targets=False)


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
        check_target(shapes, settings)


def _calibration_windows(source: ModelSource, calibration, options: RunOptions):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {source.name}: {str(e).splitlines()[0]}") from None
    return calibration.build(tokenizer)
