"""Write sharded safetensors one tensor at a time, and publish an output folder atomically.

The shard layout is planned from shapes and dtypes before any data is read,
so each shard's header is written first and then each tensor's bytes are
streamed into it: host memory holds one tensor, whatever the shard size.
Tensors of one module (a weight and its scales) always share a shard.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import OutputExistsError, ResourceError
from lowbit.files import write_json
from lowbit.quantize.checkpoint import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, dtype and shape now, its data when `read` is called."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str) -> int:
    """'2GB', '500MiB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    if not number or unit not in units:
        raise ValueError(f"not a size: {text!r} (e.g. 2GB, 500MiB)")
    return int(float(number) * units[unit])


def plan_shards(units: list[list[PendingTensor]], max_shard_bytes: int) -> list[list[PendingTensor]]:
    """Greedy: fill a shard with whole units until the next one would overflow it."""
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(t.nbytes for t in unit)
        if shards[-1] and size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes
    return shards


def _header(tensors: list[PendingTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _write_shard(path: Path, tensors: list[PendingTensor]) -> str:
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        head = _header(tensors)
        f.write(head)
        sha.update(head)
        for t in tensors:
            data = t.read().detach().to("cpu").contiguous()
            if data.dtype != t.dtype or tuple(data.shape) != t.shape:
                raise RuntimeError(f"{t.name}: planned {t.dtype}{t.shape}, got {data.dtype}{tuple(data.shape)}")
            raw = memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else b""
            f.write(raw)
            sha.update(raw)
    return sha.hexdigest()


def write_in_blocks(path: Path, name: str, blocks: Iterator[torch.Tensor], dtype: torch.dtype,
                    shape: tuple[int, ...]) -> None:
    """A safetensors file of one tensor NAME, written from BLOCKS of its first dimension in order: the
    whole tensor is never in one place (each rank's hidden states, quantize/distributed.py)."""
    with open(path, "wb") as f:
        f.write(_header([PendingTensor(name, dtype, shape, lambda: None)]))
        written = 0
        for block in blocks:
            data = block.detach().to("cpu").contiguous()
            if data.dtype != dtype or tuple(data.shape[1:]) != shape[1:]:
                raise RuntimeError(f"{name}: planned {dtype}{shape}, got a block {data.dtype}{tuple(data.shape)}")
            f.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else b"")
            written += data.shape[0]
            del data
        if written != shape[0]:
            raise RuntimeError(f"{name}: planned {shape[0]} rows, got {written}")


def write_sharded(folder: Path, units: list[list[PendingTensor]], max_shard_bytes: int,
                  on_tensor: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Write model-0000i-of-0000n.safetensors and the index; return {file: {sha256, size}}."""
    shards = plan_shards(units, max_shard_bytes)
    n = len(shards)
    files: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        if on_tensor is not None:
            shard = [PendingTensor(t.name, t.dtype, t.shape, _announce(t, on_tensor)) for t in shard]
        files[name] = {"sha256": _write_shard(folder / name, shard), "size": (folder / name).stat().st_size}
        weight_map.update({t.name: name for t in shard})
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(folder / "model.safetensors.index.json", index)
    return files


def _announce(t: PendingTensor, on_tensor: Callable[[str], None]) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        on_tensor(t.name)
        return t.read()

    return read


def check_output_free(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise OutputExistsError(f"output {output} exists (use --force to replace it)")


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Only one run may write OUTPUT (and OUTPUT.partial) at a time: an exclusive flock on OUTPUT.lock.

    The lock file is removed on the way out; a run that opened it just before that notices the file
    it locked is gone (another inode at the path, or none) and opens it again.
    """
    path = output.with_name(output.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputExistsError(f"another lowbit run (pid {holder}) is writing {output}; "
                                    f"wait for it, or stop it first") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def publish_folder(staging: Path, output: Path) -> None:
    """Move a complete staging folder into place, replacing an old output (only reached with --force)."""
    if output.exists():
        old = output.with_name(output.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old)
    else:
        staging.rename(output)


def disk_full_error(e: OSError, folder: Path, needed_bytes: int) -> ResourceError | None:
    """A clear error for a full disk; None for other OS errors."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    return ResourceError(f"disk full while writing {folder}: about {_human(needed_bytes)} needed, {_human(free)} free")


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
