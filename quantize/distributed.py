"""Many processes, one run: under torchrun the ranks split the windows and share the solves.

    torchrun --nproc-per-node N --no-python lowbit quantize ...   (or lowbit eval)

torchrun says who is who in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Every rank reads the same layer; each runs its own contiguous block of the calibration windows through
it and sums x^T x over them. Each Linear has an owner rank (spread so that the large down_proj solves
rotate over the ranks); the partial sums are added up in rank order for the owners, each owner solves
its Linears and broadcasts the dequantized weight, and every rank goes on with the quantized layer.
Rank 0 alone writes progress and output: the others send it their tensors and their hidden states.

torch.distributed does the talking: NCCL between GPUs, gloo on the CPU. A single process gets SINGLE,
whose exchanges return at once: no process group, nothing sent.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from lowbit.errors import LowbitError, UsageError
from lowbit.quantize.solve import row_bands

GATHER_BYTES = 2**25  # the Hessian's rows go round in bands of at most this many bytes (see gather_bytes)
DEFAULT_TIMEOUT_S = 1800  # a rank waiting longer than this for another gives up (LOWBIT_RANK_TIMEOUT)


class RankFailed(LowbitError):
    """Another rank stopped (killed, crashed) or stopped answering; the progress made is kept."""

    exit_code = 8


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes; world 1 is a plain single process."""

    rank: int = 0
    world: int = 1

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes, prints and holds the output lock."""
        return self.rank == 0

    def windows(self, count: int) -> slice:
        """This rank's contiguous block of COUNT windows (the first ranks get one more when it does not divide)."""
        if count < self.world:
            raise UsageError(f"{self.world} ranks need at least as many windows (--nsamples, --max-windows), not {count}")
        return window_blocks(count, self.world)[self.rank]

    def owner(self, layer: int, linear: int) -> int:
        """The rank that solves Linear number LINEAR (in the layer's order) of decoder layer LAYER: consecutive
        Linears on consecutive ranks, shifted by one each layer, so that each group's solves run side by side
        and the last Linear (down_proj, the largest) visits every rank in turn."""
        return (layer + linear) % self.world

    # ---- the exchanges: each returns at once in a single process ----

    def sum_rows(self, total: torch.Tensor, keep: bool) -> torch.Tensor | None:
        """Add up every rank's TOTAL (a float32 [K, K] partial sum) in rank order, in place where KEEP;
        returns it on the ranks that keep it, None on the others (their partial is then spent)."""
        if self.world == 1:
            return total
        rows, width = total.shape
        with _exchange("summing Hessians"):
            for start, end in row_bands(rows, width * total.element_size() * self.world, gather_bytes(total.nbytes)):
                parts = [torch.empty_like(total[start:end]) for _ in range(self.world)]
                torch.distributed.all_gather(parts, total[start:end].contiguous())
                if keep:
                    band = parts[0]
                    for part in parts[1:]:
                        band += part
                    total[start:end] = band
                del parts
        return total if keep else None

    def sum_count(self, count: int, what: str) -> int:
        return int(self._sum(count, torch.int64, what))

    def sum_float(self, value: float, what: str) -> float:
        return float(self._sum(value, torch.float64, what))

    def _sum(self, value, dtype: torch.dtype, what: str):
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=dtype, device=_comm_device())
        with _exchange(what):
            torch.distributed.all_reduce(total)
        return total.item()

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """TENSOR as rank SRC has it, on every rank (received in place)."""
        if self.world > 1:
            with _exchange("sharing a quantized weight"):
                torch.distributed.broadcast(tensor, src)
        return tensor

    def to_primary(self, value, src: int):
        """VALUE (picklable; tensors in host memory) from rank SRC, on rank 0; None on the other ranks."""
        if self.world == 1 or src == 0:
            return value if self.rank == 0 else None
        box = [value]
        with _exchange("sending results to rank 0"):
            if self.rank == src:
                torch.distributed.send_object_list(box, dst=0, device=_comm_device())
            elif self.rank == 0:
                torch.distributed.recv_object_list(box, src=src, device=_comm_device())
        return box[0] if self.rank == 0 else None

    def from_primary(self, value):
        """Rank 0's VALUE (picklable), on every rank."""
        if self.world == 1:
            return value
        box = [value]
        with _exchange("waiting for rank 0"):
            torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
        return box[0]

    def send_to_primary(self, block: torch.Tensor) -> None:
        """This rank's block of a tensor over the windows, to rank 0 one window at a time (see blocks_on_primary)."""
        with _exchange("sending hidden states to rank 0"):
            for window in block:
                torch.distributed.send(window.to(_comm_device()).contiguous(), dst=0)

    def blocks_on_primary(self, block: torch.Tensor, count: int) -> Iterator[torch.Tensor]:
        """On rank 0: a tensor over COUNT windows in window order, its own BLOCK first, then each other rank's
        windows one at a time as they arrive (the others call send_to_primary)."""
        yield block
        for src, rows in enumerate(window_blocks(count, self.world)[1:], start=1):
            for _ in range(rows.stop - rows.start):
                received = torch.empty((1, *block.shape[1:]), dtype=block.dtype, device=_comm_device())
                with _exchange("receiving hidden states"):
                    torch.distributed.recv(received[0], src=src)
                yield received
                del received

    def concat_on_primary(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Every rank's 1-d host TENSOR joined in rank order, on rank 0; None on the others."""
        if self.world == 1:
            return tensor
        box = [None] * self.world
        with _exchange("gathering scores"):
            torch.distributed.gather_object(tensor, box if self.rank == 0 else None, dst=0)
        return torch.cat(box) if self.rank == 0 else None


SINGLE = Ranks()


def gather_bytes(hessian_bytes: int) -> int:
    """The most bytes of Hessian rows (all ranks' copies) in flight at once: GATHER_BYTES, and at most a quarter
    of the Hessian, so that summing adds little to what a rank holds whatever the model's size."""
    return min(GATHER_BYTES, hessian_bytes // 4)


def window_blocks(count: int, world: int) -> list[slice]:
    """COUNT windows cut into WORLD contiguous blocks in window order, sizes differing by at most one."""
    base, extra = divmod(count, world)
    blocks, start = [], 0
    for rank in range(world):
        size = base + (rank < extra)
        blocks.append(slice(start, start + size))
        start += size
    return blocks


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun started this process with more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, each rank's own GPU (cuda:LOCAL_RANK); the device as chosen otherwise."""
    started = torchrun_world()
    if started is None or device.type != "cuda":
        return device
    if device.index not in (None, started[2]):
        raise UsageError(f"under torchrun each rank uses cuda:LOCAL_RANK; drop --device {device}")
    return torch.device("cuda", started[2])


@contextmanager
def joined(device: torch.device) -> Iterator[Ranks]:
    """This process's Ranks for the duration of a run: SINGLE without torchrun; under it, the process group
    (NCCL on GPUs, gloo on the CPU), left on the way out. A SIGTERM (torchrun stopping the survivors of
    a failed rank) ends the run as RankFailed."""
    started = torchrun_world()
    if started is None:
        yield SINGLE
        return
    rank, world, _ = started
    dist = torch.distributed
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(os.environ.get("LOWBIT_RANK_TIMEOUT", DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    except (RuntimeError, ValueError) as e:
        raise RankFailed(f"rank {rank} of {world} could not join the others: {_first_line(e)}") from None
    previous = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        yield Ranks(rank, world)
        # every rank done before any tears the group down while a peer may still talk to it. It did not
        # cure the abort at exit ("terminate called without an active exception") of the two-rank eval
        # test, which the interpreter's teardown causes: lowbit.cli.run leaves without it under torchrun
        with _exchange("finishing the run"):
            dist.barrier()
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def _stopped_by_launcher(signum, frame):
    raise RankFailed("stopped by torchrun (another rank failed); the layers done are kept: "
                     "re-run the same command to resume")


@contextmanager
def _exchange(what: str) -> Iterator[None]:
    """A failed collective (a rank gone, a timeout) as one line: RankFailed."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed's errors (DistBackendError, gloo's) derive from it
        rank = torch.distributed.get_rank()
        raise RankFailed(f"rank {rank}: another rank stopped or timed out while {what} ({_first_line(e)}); "
                         "the layers done are kept: re-run the same command to resume") from None


def _comm_device() -> torch.device:
    """Where collectives want their tensors: the GPU under NCCL, host memory under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _first_line(e: Exception) -> str:
    """The gist of a backend's error: its first sentence, without gloo's source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())
    text = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
    return text[:160]
