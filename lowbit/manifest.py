"""The files a lowbit checkpoint adds: lowbit_manifest.json (what it is, how it was made, how good it is)
and lowbit_calibration.json (the calibration windows' token ids). See DESIGN.md for both.

This module is their one owner: the quantizer creates the manifest, eval and `lowbit run` add their
entries, all through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from lowbit import __version__
from lowbit.errors import CorruptInputError, UsageError
from lowbit.files import write_json

MANIFEST = "lowbit_manifest.json"
CALIBRATION_FILE = "lowbit_calibration.json"
FORMAT = "lowbit-manifest"


def manifest_header() -> dict:
    """The entries every manifest starts with: its format, version and the tool that wrote it."""
    return {"format": FORMAT, "version": 1, "tool": {"name": "lowbit", "version": __version__}}


def read_manifest(folder: Path) -> dict:
    file = Path(folder) / MANIFEST
    if not file.exists():
        raise UsageError(f"no {MANIFEST} in {folder} (not a lowbit checkpoint)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptInputError(f"{file} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptInputError(f"{file} is not a lowbit manifest")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write the manifest (temporary file renamed into place). It lists no checksum of itself."""
    write_json(Path(folder) / MANIFEST, manifest)


def update_manifest(folder: Path, key: str, value) -> dict:
    """Set one top-level entry of FOLDER's manifest and rewrite it; returns the new manifest."""
    manifest = read_manifest(folder)
    manifest[key] = value
    write_manifest(folder, manifest)
    return manifest


def save_windows(path: Path, windows: Tensor) -> None:
    """Write {"windows": [[ids...], ...]} to path via a temporary file renamed into place."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"windows": windows.tolist()}, separators=(",", ":")))
    os.replace(temporary, path)


def load_windows(path: Path) -> Tensor:
    """The [nsamples, seqlen] int64 windows saved by save_windows."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"calibration windows file not found: {path}")
    try:
        windows = json.loads(path.read_text(encoding="utf-8"))["windows"]
        tensor = torch.tensor(windows, dtype=torch.int64)
    except (ValueError, KeyError, TypeError):
        raise CorruptInputError(f"{path} is not a calibration windows file") from None
    if tensor.dim() != 2 or tensor.numel() == 0:
        raise CorruptInputError(f"{path} does not hold a non-empty list of equal-length windows")
    return tensor
