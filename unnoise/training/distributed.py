"""Running on several processes with PyTorch's own engine (torchrun + torch.distributed).

``torchrun --nproc_per_node N -m unnoise ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR;
:func:`init` joins that process group (gloo on CPU, nccl when CUDA is present). Everything else in
the package asks :func:`current` which :class:`Shard` it is and stays correct with one process.

Results do not depend on the number of processes, by construction:

- a global batch of B rows is split into equal contiguous parts, one per rank (:meth:`Shard.rows`);
  every rank draws the random numbers of the *whole* batch from the same generator and keeps its
  rows (:class:`Draws`), so sample i sees the same t and noise, and the generator ends each step in
  the same state, whatever N;
- sampling and evaluation run in fixed chunks of the global index range, dealt round-robin to the
  ranks (:func:`map_chunks`), with per-sample seeds: each chunk is computed exactly as one process
  computes it, and the gathered results are identical.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes files, logs and progress bars."""
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` rows (which must divide evenly)."""
        if batch % self.world:
            raise ValueError(
                f"the global batch size {batch} must be a multiple of the number of processes {self.world}"
            )
        part = batch // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def chunks(self, n: int, chunk: int) -> list[range]:
        """This rank's chunks of ``range(n)``: chunks of ``chunk`` indices, dealt round-robin."""
        starts = range(chunk * self.rank, n, chunk * self.world)
        return [range(s, min(n, s + chunk)) for s in starts]


def current() -> Shard:
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def launched() -> bool:
    """True inside a torchrun (or any env:// launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_s: float = 1800.0) -> Shard:
    """Join the launcher's process group when there is one; a single process needs none.

    The backend is nccl when CUDA is available (one device per local rank), gloo otherwise.
    """
    if not launched() or dist.is_initialized():
        return current()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device of this rank: its GPU under nccl, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


def mean(value: float) -> float:
    """The mean over ranks of a per-rank scalar (itself with one process)."""
    if current().world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.item() / current().world


def gather_rows(x: Tensor) -> Tensor:
    """The rows of every rank's equal-sized ``x``, concatenated in rank order (a global batch)."""
    if current().world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(current().world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def map_chunks(fn: Callable[[range], Tensor], n: int, chunk: int) -> Tensor:
    """``fn`` over ``range(n)`` in chunks, sharded over the ranks; every rank gets all rows in order.

    ``fn(indices)`` returns a tensor with one row per index; it must depend only on the indices
    (per-sample seeds), so the result is the same for any number of processes.
    """
    shard = current()
    local = {r.start: fn(r).cpu() for r in shard.chunks(n, chunk)}
    if shard.world > 1:
        everything: list[dict[int, Tensor]] = [{} for _ in range(shard.world)]
        dist.all_gather_object(everything, local)  # between our own processes only
        local = {k: v for part in everything for k, v in part.items()}
    return torch.cat([local[s] for s in sorted(local)])


class Stopped(Exception):
    """The launcher's SIGTERM: torchrun stops every process of the group when one of them fails."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Stopped`, so a stopped process unwinds (closing its files) and says why."""

    def handler(signum: int, frame: object) -> None:
        raise Stopped("stopped by the launcher (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)


# What a process sees when another process of its group dies: the launcher's SIGTERM, or (when
# the launcher has not noticed yet, e.g. on another node) a failed collective. Inside backward,
# gloo's and nccl's errors reach Python as plain RuntimeErrors, told apart by their text.
_BACKEND_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "processgroup", "broken pipe")


def is_group_failure(error: BaseException) -> bool:
    """Whether ``error`` means another process of the group has failed (not a bug of this one)."""
    if isinstance(error, (Stopped, dist.DistError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and current().world > 1 and any(w in text for w in _BACKEND_WORDS)


class Draws:
    """Random numbers for a global batch, of which this process keeps its rows.

    Every rank draws the numbers of all ``batch`` rows from ``generator`` (cheap next to the
    network) and keeps its own, so the draws of each sample, and the generator's state after the
    step, are those of a single process.
    """

    def __init__(self, generator: torch.Generator, batch: int, shard: Shard | None = None) -> None:
        self.generator, self.batch = generator, batch
        self.part = (shard or Shard()).rows(batch)

    def keep(self, x: Tensor) -> Tensor:
        """This rank's rows of a tensor drawn for the whole batch."""
        return x[self.part]

    def rand(self, *shape: int) -> Tensor:
        return self.keep(torch.rand((self.batch, *shape), generator=self.generator))

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.keep(torch.randn((self.batch, *shape), generator=self.generator, dtype=dtype))

    def randint(self, low: int, high: int) -> Tensor:
        return self.keep(torch.randint(low, high, (self.batch,), generator=self.generator))


__all__ = [
    "Draws",
    "Stopped",
    "Shard",
    "barrier",
    "close",
    "current",
    "device",
    "gather_rows",
    "init",
    "is_group_failure",
    "launched",
    "map_chunks",
    "mean",
    "stop_on_sigterm",
]
