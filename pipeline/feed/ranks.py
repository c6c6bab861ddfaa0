"""Where a process stands in a ``torchrun`` job: its rank, the world size, its device and its shard of the samples.

A single process is the world of one, so the trainer has one code path.
Each rank trains on a contiguous shard of the sample axis, which keeps its
cache reads to the chunks of its own samples (two neighbouring ranks share at
most one boundary chunk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.devices import resolve_device
from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class Ranks:
    """This process's rank and the world size (1 outside torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and progress bars."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """The half-open sample range ``[lo, hi)`` this rank trains on."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def steps_size(self, n: int) -> int:
        """Samples every rank walks per epoch (the largest shard), so all ranks take the same number of steps."""
        return -(-n // self.world)

    def close(self) -> None:
        """Leave the process group at the end of a run."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Average gradients of parameters that DistributedDataParallel does not manage."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world


def init_ranks(device: str) -> tuple[Ranks, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on GPU) and pick this rank's
    device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return Ranks(), dev
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise KdcacheError("WORLD_SIZE is set but RANK is not: launch multi-process training with torchrun") from None
    if dev.type == "cuda":
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count()
        if per_node > gpus:
            raise KdcacheError(
                f"torchrun started {per_node} processes on this node but only {gpus} GPU(s) are visible, and "
                f"NCCL needs one GPU per process: use --nproc-per-node {gpus}, or --device cpu"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Ranks(rank, world), dev
