"""The torchrun environment: process group set-up, rank-0 helpers and reductions.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) every helper here
acts as a single process and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_request: str) -> DistributedContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1: NCCL on CUDA, Gloo otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device_request != "cpu" and torch.cuda.is_available()
    backend = "nccl" if wants_cuda else "gloo"
    if not dist.is_initialized():
        if wants_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend)


def shutdown_distributed(context: DistributedContext) -> None:
    """Wait for every rank, then leave the process group.

    Rank 0 writes the final model and summary after the last collective, so the
    barrier keeps the other ranks connected until it is done. If a peer is
    already gone, the barrier fails and the group is destroyed anyway.
    NOTE: workers still aborted now and then during interpreter teardown after
    this point (Gloo, PyTorch 2.13), which is why ``__main__`` ends them with
    ``os._exit``.
    """
    if not (context.enabled and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except RuntimeError:
        pass
    dist.destroy_process_group()


def broadcast_object(value: Any, context: DistributedContext) -> Any:
    """Send ``value`` from rank 0 to every rank; a no-op in a single process."""
    if not context.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(values: list[float], context: DistributedContext, device: torch.device) -> list[float]:
    """Sum a list of numbers over all ranks (float64, so counts stay exact)."""
    if not context.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if context.backend == "nccl":
        tensor = tensor.to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_max(value: int, context: DistributedContext, device: torch.device) -> int:
    """Return the largest value of one integer over all ranks."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def sync_buffers(module: torch.nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward pass, so after
    the last batch of an epoch every rank holds statistics updated by its own
    batch. Validation must run with the statistics that rank 0 saves.
    """
    if not context.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def all_ranks_true(flag: bool, context: DistributedContext, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank, so all ranks take the same branch."""
    if not context.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())
