"""torch.distributed for the trainer: which rank am I, and the few collectives the loop needs.

Launched by ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT), the trainer joins a process group: NCCL on GPUs, gloo on CPUs. Without those variables
everything here degrades to single-process no-ops, so the same code runs everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def shard(count: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``count`` items; the first ``count % world_size`` ranks get one more."""
    size, extra = divmod(count, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (1 if rank < extra else 0))


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` in ``min(parts, len(items))`` contiguous chunks whose sizes differ by at most one (none
    when there are no items)."""
    parts = max(1, min(parts, len(items)))
    return [items[shard(len(items), p, parts)] for p in range(parts)] if items else []


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device_type: str) -> DistributedContext:
        """Join the process group described by the launcher's environment (once per process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistributedContext()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        )

    def device(self, requested: str) -> torch.device:
        """``auto``: this rank's GPU when there is one, else the CPU."""
        if requested == "auto":
            return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if requested == "cuda" and self.enabled:
            return torch.device(f"cuda:{self.local_rank}")
        return torch.device(requested)

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable plain data between our own processes), in rank order."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def all_reduce_grads(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over ranks, in one flat buffer per dtype (few collectives, not one per tensor)."""
        if not self.enabled:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in parameters:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group together: a process that exits with it alive can abort in a library's
        thread at interpreter shutdown (seen with gloo and DeepSpeed: "terminate called without an active
        exception", exit -6), failing a run that finished."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
