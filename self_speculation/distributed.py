"""Several processes under torchrun: shard the samples, gather the results on rank 0.

``python script.py`` needs none of this: without torchrun's environment the context is a
single process (rank 0 of 1) and nothing is initialised. Under ``torchrun
--nproc_per_node N`` each rank takes every N-th sample; gloo is used on CPU, nccl on GPU.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from self_speculation.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among its peers.

    Attributes:
        rank: this process's index, 0 .. world_size - 1.
        world_size: number of processes.
        local_rank: index on this machine (picks the GPU).
        initialized: whether a process group was set up (and must be torn down).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(requested: bool | None = None, device: str | None = None) -> DistributedContext:
    """Initialise the process group when launched by torchrun with more than one process.

    Args:
        requested: True: require torchrun; False: refuse to run as several processes;
            None: decide from the environment.
        device: the device the caller will use (nccl for cuda, gloo otherwise).

    Raises:
        ConfigError: ``requested`` contradicts how the process was launched.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if requested and not launched_by_torchrun():
        raise ConfigError(
            "--distributed True needs torchrun (torchrun --nproc_per_node N script.py ...)"
        )
    if requested is False and world_size > 1:
        raise ConfigError(
            f"launched as {world_size} processes but --distributed False: use python or --nproc_per_node 1"
        )
    if world_size == 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return DistributedContext(rank, world_size, local_rank, initialized=True)


def device_for(context: DistributedContext, device: str | None) -> str | None:
    """The device this rank uses: one GPU per rank under torchrun."""
    if context.world_size > 1 and (
        device == "cuda" or (device is None and torch.cuda.is_available())
    ):
        return f"cuda:{context.local_rank}"
    return device


def shard(items: Sequence[T], context: DistributedContext) -> list[T]:
    """This rank's share of ``items``: every world_size-th item, starting at rank."""
    return list(items[context.rank :: context.world_size])


def gather(obj: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a single-item list alone)."""
    if context.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: T, context: DistributedContext) -> T:
    """Rank 0's ``obj`` on every rank."""
    if context.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(context: DistributedContext) -> None:
    if context.world_size > 1:
        dist.barrier()


def teardown(context: DistributedContext) -> None:
    if context.initialized and dist.is_initialized():
        dist.destroy_process_group()
