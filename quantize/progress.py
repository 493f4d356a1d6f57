"""Progress of a quantization run, kept so that a killed run resumes where it stopped.

`OUTPUT.partial/.lowbit-progress/` holds one safetensors file per finished decoder
layer, the activations entering the next layer, and `progress.json`, written last:
it is the commit point. Progress made under another fingerprint (settings, source
files, calibration windows) is stale and refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowbit.errors import OutputExistsError
from lowbit.files import write_json
from lowbit.quantize.checkpoint import SafetensorsCheckpoint
from lowbit.quantize.settings import QuantizeSettings
from lowbit.quantize.distributed import SINGLE, Ranks
from lowbit.quantize.stream import Activations
from lowbit.quantize.writer import write_in_blocks


def progress_fingerprint(settings: QuantizeSettings, reader: SafetensorsCheckpoint, config: dict, calibration_info: dict | None) -> str:
    """What the output depends on; progress made under another fingerprint is stale."""
    tensors = sorted((name, str(info.dtype), info.shape, info.file.stat().st_size, info.file.stat().st_mtime_ns)
                     for name, info in reader.tensors.items())
    data = {
        "settings": asdict(settings),
        "config": config,
        "tensors": tensors,
        "calibration": calibration_info and calibration_info.get("windows_sha256"),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def open_progress(work: Path, progress_dir: Path, fingerprint: str, force: bool) -> dict:
    progress_file = progress_dir / "progress.json"
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
        if progress.get("fingerprint") == fingerprint:
            return progress
        if not force:
            raise OutputExistsError(f"{work} holds progress of a run with other settings or inputs; "
                                    f"re-run with --force to discard it and start over")
    if work.exists():
        shutil.rmtree(work)
    progress_dir.mkdir(parents=True)
    progress = {"fingerprint": fingerprint, "layers_done": 0, "layers": {},
                "created": created_timestamp()}
    write_json(progress_file, progress)
    return progress


def created_timestamp() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (reproducible builds: two runs then write identical manifests)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    seconds = int(epoch) if epoch.isdigit() else time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with a full disk raised as the OSError that open() would raise."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        for code in (errno.ENOSPC, errno.EDQUOT):
            if f"os error {code})" in str(e):
                raise OSError(code, os.strerror(code), str(path)) from None
        raise


def candidates_dir(progress_dir: Path, tag: str) -> Path:
    """Where a size budget's other candidate format (pack.LinearFormat.tag) keeps its layer files."""
    return progress_dir / "candidates" / tag


def save_layer(progress_dir: Path, index: int, tensors: dict[str, torch.Tensor], progress: dict,
                layer_stats: dict, acts: Activations | None,
                candidates: dict[str, dict[str, torch.Tensor]] | None = None, ranks: Ranks = SINGLE,
                windows: int = 0) -> None:
    """Persist one finished layer: its tensors, then its state; progress.json is written last, so a crash
    leaves a consistent state.

    candidates: under a size budget, each other format's tensors of this layer, by format tag: kept in a
    folder per format, under the same names as the layer file's, until assemble chooses.
    Under torchrun (rank 0 only): the hidden states of all WINDOWS, each rank's block in turn."""
    save_layer_tensors(progress_dir, index, tensors, candidates)
    save_layer_state(progress_dir, index, progress, layer_stats, acts, ranks, windows)


def save_layer_tensors(progress_dir: Path, index: int, tensors: dict[str, torch.Tensor],
                       candidates: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """The layer file (and a size budget's candidates): the layer is not done until save_layer_state."""
    for tag, tensors_of_tag in (candidates or {}).items():
        folder = candidates_dir(progress_dir, tag)
        folder.mkdir(parents=True, exist_ok=True)
        _save_layer_file(folder, index, tensors_of_tag)
    _save_layer_file(progress_dir, index, tensors)


def save_layer_state(progress_dir: Path, index: int, progress: dict, layer_stats: dict, acts: Activations | None,
                     ranks: Ranks = SINGLE, windows: int = 0, fp_hidden: torch.Tensor | None = None) -> None:
    """The hidden states leaving the layer (and the unquantized model's, FP_HIDDEN, where fp_targets.py runs
    them), then progress.json: from here a resumed run starts after it."""
    saved = [("activations", acts.hidden)] if acts is not None else []
    if fp_hidden is not None:
        saved.insert(0, ("fp-activations", fp_hidden))
    for stem, hidden in saved:
        tmp = progress_dir / f"{stem}-{index + 1:05d}.safetensors.tmp"
        count = windows or hidden.shape[0]
        write_in_blocks(tmp, "hidden", ranks.blocks_on_primary(hidden, count), hidden.dtype, (count, *hidden.shape[1:]))
        tmp.replace(progress_dir / f"{stem}-{index + 1:05d}.safetensors")
    progress["layers_done"] = index + 1
    progress["layers"].update(layer_stats)
    write_json(progress_dir / "progress.json", progress)
    for stem, _ in saved:
        (progress_dir / f"{stem}-{index:05d}.safetensors").unlink(missing_ok=True)


class LayerSaver:
    """save_layer for the calibrated loop, its state (the activations, 75 MB a layer for SmolLM2 at 64 x 512,
    and progress.json) in a thread of its own where IN_BACKGROUND (activations in host memory, one process):
    written while the next layer's first passes run, which only read the activations; `wait` comes before
    anything writes them. The layer file is written at once, so nothing stays referenced longer than
    before (the same memory). Leaving the `with` waits for the last save; a save's error is raised by the
    next wait."""

    def __init__(self, in_background: bool = False):
        self.pool = ThreadPoolExecutor(max_workers=1) if in_background else None
        self.pending: Future | None = None

    def save(self, progress_dir: Path, index: int, tensors: dict[str, torch.Tensor], progress: dict,
             layer_stats: dict, acts: Activations, candidates=None, ranks: Ranks = SINGLE, windows: int = 0,
             fp_hidden: torch.Tensor | None = None) -> None:
        self.wait()
        save_layer_tensors(progress_dir, index, tensors, candidates)
        state = (progress_dir, index, progress, layer_stats, acts, ranks, windows, fp_hidden)
        if self.pool is None:
            save_layer_state(*state)
        else:
            self.pending = self.pool.submit(save_layer_state, *state)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "LayerSaver":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def read_activations(path: Path, windows: slice = slice(None)) -> torch.Tensor:
    """The hidden states saved with a layer, of the WINDOWS asked for (a rank's block) only."""
    with safe_open(str(path), "pt") as f:
        return f.get_slice("hidden")[windows]


def _save_layer_file(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    tmp = folder / f"layer-{index:05d}.safetensors.tmp"
    save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    tmp.replace(folder / f"layer-{index:05d}.safetensors")
