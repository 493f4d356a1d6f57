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
from lowbit.network import local_only, offline_hint
from lowbit.quantize.sweep import all_finite

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
    return _download_from_hub(hub_repo_id(name), revision, token)


def hub_repo_id(name: str) -> str:
    """NAME, when it is not a local path and can be a Hub repo id."""
    if not REPO_ID.match(name):
        raise UsageError(f"model not found: {name} (no such folder, and not a Hub repo id)")
    return name


def no_such_repo(repo_id: str) -> UsageError:
    return UsageError(f"model not found: {repo_id} (no such Hub repo, or no access to it)")


def _download_from_hub(repo_id: str, revision: str | None, token: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache_only = local_only()
    try:
        folder = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_PATTERNS,
                                   local_files_only=cache_only)
    except RepositoryNotFoundError:
        raise no_such_repo(repo_id) from None
    except LocalEntryNotFoundError:
        raise UsageError(f"model {repo_id} cannot be had: {offline_hint()}") from None
    except HfHubHTTPError as e:
        raise UsageError(f"cannot download {repo_id}: HTTP {e.response.status_code if e.response is not None else '?'}") from None
    except OSError as e:
        raise UsageError(f"cannot download {repo_id}: {e.__class__.__name__}") from None
    return ModelSource(name=repo_id, folder=Path(folder), revision=revision or "main")


def read_config(model: str, revision: str | None = None, token: str | None = None) -> dict:
    """config.json of a local folder (or the file itself), or of a Hub repo (that file alone is downloaded)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    path = Path(model).expanduser()
    if path.is_dir():
        return load_config_dict(path)
    if path.is_file() and path.name.endswith(".json"):
        return load_config_dict(path.parent) if path.name == "config.json" else _json_object(path)
    repo_id = hub_repo_id(model)
    cache_only = local_only()
    try:
        file = hf_hub_download(repo_id, "config.json", revision=revision, token=token, local_files_only=cache_only)
    except RepositoryNotFoundError:
        raise no_such_repo(repo_id) from None
    except LocalEntryNotFoundError as e:
        if cache_only:
            raise UsageError(f"cannot read config.json of {repo_id}: {offline_hint()}") from None
        raise UsageError(f"cannot download config.json of {repo_id}: {type(e).__name__}") from None
    except (HfHubHTTPError, OSError) as e:
        raise UsageError(f"cannot download config.json of {repo_id}: {type(e).__name__}") from None
    return load_config_dict(Path(file).parent)


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CorruptInputError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CorruptInputError(f"{path} is not a JSON object")
    return data


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
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, or an int of 5000 digits
        raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        fields = _parse_entry(entry)
        if fields is None:
            raise corrupt(f"bad entry for tensor {name!r}")
        dtype, shape, (begin, end) = fields
        numel, stride_bound = 1, 1
        for d in shape:
            numel *= d
            stride_bound *= max(d, 1)
        if stride_bound > 2**62:  # torch could not even describe an empty tensor of that shape
            raise corrupt(f"tensor {name!r} has an impossible shape {list(shape)}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize:
            raise corrupt(f"tensor {name!r} has {end - begin} bytes, its shape needs {numel * itemsize}")
        if data_start + end > size:
            raise corrupt(f"tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = TensorInfo(file, dtype, shape, data_start + begin, data_start + end)
    return tensors


def _parse_entry(entry) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]] | None:
    """(dtype, shape, (begin, end)) of one header entry; None when it is malformed."""

    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return None
    dtype, shape, offsets = SAFETENSORS_DTYPES.get(entry["dtype"]), entry.get("shape"), entry.get("data_offsets")
    if dtype is None or not isinstance(shape, list) or not all(is_count(d) for d in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        return None
    return dtype, tuple(shape), (offsets[0], offsets[1])


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, read on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = weight_files(self.folder, "model.safetensors.index.json", "*.safetensors")
        if not files:
            hint = " (only pickled .bin weights: unpickling can run code)" if pickle_files(self.folder) else ""
            raise UsageError(f"no safetensors weights in {folder}{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(read_header(file))

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
        if check_finite:
            check_all_finite(name, tensor)
        return tensor

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with prefix, keyed by the rest of its name."""
        return {name[len(prefix) :]: self.read(name) for name in self.tensors if name.startswith(prefix)}

    def prefetch_prefix(self, prefix: str) -> None:
        """Ask the kernel to start reading these tensors' bytes now (posix_fadvise WILLNEED), into the page
        cache and not this process: the next layer comes off the disk while this one is solved."""
        if not hasattr(os, "posix_fadvise"):
            return
        ranges: dict[Path, list[tuple[int, int]]] = {}
        for name, info in self.tensors.items():
            if name.startswith(prefix) and info.nbytes:
                ranges.setdefault(info.file, []).append((info.start, info.nbytes))
        for file, spans in ranges.items():
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue  # the read itself will say what is wrong
            try:
                for start, length in spans:
                    os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


class PickleCheckpoint(SafetensorsCheckpoint):
    """Pickled PyTorch weights (*.bin), read only when the user allows it (--allow-pickle).

    torch.load(weights_only=True) unpickles nothing but tensors and plain containers,
    and mmap=True leaves the data on disk until a tensor is read.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors = {}
        self._data: dict[str, torch.Tensor] = {}
        for file in pickle_files(self.folder):
            for name, tensor in _load_pickle(file).items():
                self._data[name] = tensor
                self.tensors[name] = TensorInfo(file, tensor.dtype, tuple(tensor.shape), 0,
                                                tensor.numel() * tensor.element_size())

    def prefetch_prefix(self, prefix: str) -> None:
        pass  # the memory map pages in on the read

    def read(self, name: str, check_finite: bool = True) -> torch.Tensor:
        tensor = self._data[name].clone()  # out of the memory map now, as a safetensors read would
        if check_finite:
            check_all_finite(name, tensor)
        return tensor


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a refused global, a truncated zip, an old non-zip pickle, ...
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptInputError(f"cannot load pickled weights {file.name} safely: {why[:200]}") from None
    is_state_dict = isinstance(state, dict) and all(isinstance(k, str) for k in state)
    if not is_state_dict or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptInputError(f"pickled weights {file.name} are not a plain state dict of tensors")
    return state


def open_checkpoint(folder: Path, allow_pickle: bool = False) -> SafetensorsCheckpoint:
    """A model's weights: safetensors, or pickled .bin files when it has no safetensors and allow_pickle is set."""
    folder = Path(folder)
    if weight_files(folder, "model.safetensors.index.json", "*.safetensors") or not pickle_files(folder):
        return SafetensorsCheckpoint(folder)
    if not allow_pickle:
        raise CorruptInputError(f"{folder} has only pickled .bin weights, and unpickling can run code: convert "
                                f"them to safetensors, or pass --allow-pickle to load them with weights_only=True")
    return PickleCheckpoint(folder)


def weight_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    """The weight files of a checkpoint: the shards its index names, else every file matching pattern."""
    index_file = folder / index_name
    if index_file.exists():
        return _files_from_index(folder, index_file)
    return sorted(folder.glob(pattern))


def pickle_files(folder: Path) -> list[Path]:
    files = weight_files(folder, "pytorch_model.bin.index.json", "*.bin")
    return [f for f in files if f.name != "training_args.bin"]  # the Trainer's pickled arguments, not weights


def _files_from_index(folder: Path, index_file: Path) -> list[Path]:
    """The shards an index names; a name that is not a plain file name ('../x', 'a/b') is refused."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError):  # ValueError covers bad JSON and bad UTF-8
        raise CorruptInputError(f"corrupt index file {index_file.name}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptInputError(f"corrupt index file {index_file.name}: weight_map is not names to files")
    files = []
    for shard in sorted(set(weight_map.values())):
        # Hub snapshots are symlinks into a blob store: judge the name, not the resolved path.
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CorruptInputError(f"index names a shard outside the model folder: {shard}")
        if not (folder / shard).is_file():
            raise CorruptInputError(f"index names a missing shard: {shard}")
        files.append(folder / shard)
    return files


def check_all_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not all_finite(tensor):
        raise CorruptInputError(f"weight {name} contains NaN or Inf")


def check_remote_code(config: dict, name: str, trust_remote_code: bool) -> None:
    """Refuse a model whose config needs the repo's own Python code, unless the user trusts it.

    transformers ignores auto_map for model types it knows, so only unknown types need the code.
    """
    from transformers import CONFIG_MAPPING

    if trust_remote_code or not config.get("auto_map") or config.get("model_type") in CONFIG_MAPPING:
        return
    raise UsageError(f"{name} needs its own Python code (model_type {config.get('model_type')!r} with an auto_map "
                     f"in config.json); lowbit runs a repo's code only with --trust-remote-code")


def load_config_dict(folder: Path) -> dict:
    file = Path(folder) / "config.json"
    if not file.exists():
        raise UsageError(f"no config.json in {folder}")
    try:
        config = json.loads(file.read_text())
    except (ValueError, RecursionError):  # bad JSON or bad UTF-8
        raise CorruptInputError(f"config.json in {folder} is not valid JSON") from None
    if not isinstance(config, dict):
        raise CorruptInputError(f"config.json in {folder} is not a JSON object")
    return config

