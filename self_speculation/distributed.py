"""Several processes under torchrun: shard the samples, gather the results on rank 0.

``python script.py`` needs none of this: without torchrun's environment the context is a
single process (rank 0 of 1) and nothing is initialised. Under ``torchrun
--nproc_per_node N`` each rank takes every N-th sample; gloo is used on CPU, nccl on GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from self_speculation.errors import ConfigError, whole_number

logger = logging.getLogger(__name__)

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


def _environment_integer(name: str, default: int, least: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if not whole_number(value, least):
        raise ConfigError(
            f"environment variable {name}={text!r} must be an integer >= {least} "
            "(set by torchrun; unset it to run as one process)"
        )
    return value


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, checked: integers, the
    ranks below the world size (a process whose rank no other process expects would wait
    for the rendezvous for hours). (0, 1, 0) when not launched by torchrun.

    Raises:
        ConfigError: a variable is not such an integer.
    """
    if not launched_by_torchrun():
        return 0, 1, 0
    world_size = _environment_integer("WORLD_SIZE", 1, 1)
    rank = _environment_integer("RANK", 0, 0)
    local_rank = _environment_integer("LOCAL_RANK", 0, 0)
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank)):
        if value >= world_size:
            raise ConfigError(
                f"environment variable {name}={value} must be below WORLD_SIZE={world_size} "
                "(set by torchrun; unset them to run as one process)"
            )
    return rank, world_size, local_rank


def setup(requested: bool | None = None, device: str | None = None) -> DistributedContext:
    """Initialise the process group when launched by torchrun with more than one process.

    Args:
        requested: True: require torchrun; False: refuse to run as several processes;
            None: decide from the environment.
        device: the device the caller will use (nccl for cuda, gloo otherwise).

    Raises:
        ConfigError: ``requested`` contradicts how the process was launched.
    """
    rank, world_size, local_rank = launch_environment()
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
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: launch with torchrun "
            "(or unset RANK and WORLD_SIZE to run as one process)"
        )
    use_cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Blocks until all world_size processes have joined: say so, or a process started
        # by hand with torchrun's variables would wait without a word.
        logger.info(
            "rank %d waiting for %d processes at %s:%s",
            rank,
            world_size,
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
        )
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


# What gloo raises in a collective whose peer process is gone (or stalled past the timeout).
_LOST_PEER = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting")


def lost_process(error: BaseException) -> str | None:
    """Why a collective failed, in a few words, when ``error`` says another process of the
    run is gone (killed, or stopped by its own error, which that process reports); None for
    any other error, a mismatched collective (a bug) included.

    gloo raises a plain RuntimeError naming its source file ("[.../gloo/transport/tcp/
    pair.cc:553] Connection closed by peer [127.0.0.1]:14498. This is typically caused by a
    remote worker crashing..."). Decided from torchrun's environment: the process group is
    torn down by the time a script's handler sees the error.
    """
    if not (launched_by_torchrun() and isinstance(error, RuntimeError)):
        return None
    text = " ".join(str(error).split())
    if "gloo/transport" not in text or not _LOST_PEER.search(text):
        return None
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ", 1)[0]  # no source file, no advice


def teardown(context: DistributedContext) -> None:
    if context.initialized and dist.is_initialized():
        dist.destroy_process_group()
