"""Find a model and read its safetensors lazily, one tensor at a time.

We parse the safetensors header ourselves and read each tensor with a plain
seek + read: no memory map stays open, so host memory holds only the tensors
we asked for, and a truncated or corrupt file is caught with a clear error
before anything is computed.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import CorruptInputError, UsageError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What we download from a Hub repo: weights, configs, tokenizer. Never pickles or code.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder."""

    name: str  # what the user named: a path or a Hub repo id
    folder: Path
    revision: str | None = None


def resolve_model(name: str, revision: str | None = None, token: str | None = None) -> ModelSource:
    """A local folder, or a Hub repo id downloaded (weights, config, tokenizer only)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"model must be a folder, not a file: {name}")
        return ModelSource(name=name, folder=path.resolve(), revision=revision)
    if not REPO_ID.match(name) or name.startswith((".", "/")):
        raise UsageError(f"model not found: {name} (no such folder, and not a Hub repo id)")
    return _download_from_hub(name, revision, token)


def _download_from_hub(repo_id: str, revision: str | None, token: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_PATTERNS)
    except RepositoryNotFoundError:
        raise UsageError(f"model not found: {repo_id} (no such Hub repo, or no access to it)") from None
    except LocalEntryNotFoundError:
        raise UsageError(f"model not found: {repo_id} (not in the local cache, and the Hub cannot be reached)") from None
    except HfHubHTTPError as e:
        raise UsageError(f"cannot download {repo_id}: HTTP {e.response.status_code if e.response is not None else '?'}") from None
    except OSError as e:
        raise UsageError(f"cannot download {repo_id}: {e.__class__.__name__}") from None
    return ModelSource(name=repo_id, folder=Path(folder), revision=revision or "main")


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; every problem is a CorruptInputError."""
    size = file.stat().st_size

    def corrupt(why: str) -> CorruptInputError:
        return CorruptInputError(f"corrupt safetensors file {file.name}: {why}")

    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise corrupt(f"header length {header_len} exceeds the file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor {name!r}") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise corrupt(f"negative dimension in {name!r}")
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end - begin != numel * itemsize:
            raise corrupt(f"tensor {name!r} has {end - begin} bytes, its shape needs {numel * itemsize}")
        if data_start + end > size:
            raise corrupt(f"tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = TensorInfo(file, dtype, shape, data_start + begin, data_start + end)
    return tensors


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, read on demand."""

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
                hint = " (it has pickled .bin weights, which lowbit does not load: unpickling runs code)"
                if allow_pickle:
                    hint = " (pickled .bin weights: convert them to safetensors first)"
                raise UsageError(f"no safetensors weights in {folder}{hint}")
            raise UsageError(f"no safetensors weights in {folder}")
        index_file = self.folder / "model.safetensors.index.json"
        if index_file.exists():
            files = self._files_from_index(index_file)
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(read_header(file))

    def _files_from_index(self, index_file: Path) -> list[Path]:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorruptInputError(f"corrupt index file {index_file.name}") from None
        files = []
        for shard in sorted(set(weight_map.values())):
            file = (self.folder / shard).resolve()
            if file.parent != self.folder.resolve():
                raise CorruptInputError(f"index names a shard outside the model folder: {shard}")
            if not file.exists():
                raise CorruptInputError(f"index names a missing shard: {shard}")
            files.append(file)
        return files

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, check_finite: bool = True) -> torch.Tensor:
        info = self.tensors[name]
        buffer = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(buffer) != info.nbytes:
                raise CorruptInputError(f"corrupt safetensors file {info.file.name}: {name} is truncated")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        tensor = torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)
        if check_finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CorruptInputError(f"weight {name} contains NaN or Inf")
        return tensor

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with prefix, keyed by the rest of its name."""
        return {name[len(prefix) :]: self.read(name) for name in self.tensors if name.startswith(prefix)}

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def load_config_dict(folder: Path) -> dict:
    file = Path(folder) / "config.json"
    if not file.exists():
        raise UsageError(f"no config.json in {folder}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError:
        raise CorruptInputError(f"config.json in {folder} is not valid JSON") from None
    if not isinstance(config, dict):
        raise CorruptInputError(f"config.json in {folder} is not a JSON object")
    return config


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None
