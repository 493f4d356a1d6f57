"""lowbit_manifest.json: what a lowbit checkpoint is, how it was made, how good it is (see DESIGN.md)."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import CorruptInputError, UsageError

MANIFEST = "lowbit_manifest.json"
CALIBRATION_FILE = "lowbit_calibration.json"


def read_manifest(folder: Path) -> dict:
    file = Path(folder) / MANIFEST
    if not file.exists():
        raise UsageError(f"no {MANIFEST} in {folder} (not a lowbit checkpoint)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptInputError(f"{file} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lowbit-manifest":
        raise CorruptInputError(f"{file} is not a lowbit manifest")
    return manifest
