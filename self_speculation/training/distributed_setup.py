"""Where training runs: the device, data parallelism (FSDP2 or DDP), mixed precision and
activation checkpointing, and gathering the full weights back for the final export.

One command serves one CPU, one GPU, several GPUs and several nodes: ``torchrun`` sets the
rank and world size (:mod:`self_speculation.distributed` reads them), each process takes
one GPU (``cuda:LOCAL_RANK``) or the CPU, and

* ``--fsdp True`` shards every decoder layer and then the root (the objective: embeddings,
  final norm, LM head) with FSDP2 ``fully_shard``: each process holds 1/N of the weights,
  gradients and optimizer state; a layer's full weights exist only while it runs. Mixed
  precision is FSDP's policy (bf16 compute, fp32 gradient reduction, fp32 master weights);
  ``--fsdp_cpu_offload True`` keeps the shards in CPU memory.
* otherwise, with several processes, DDP (every process holds everything; gradients are
  all-reduced) and bf16 autocast.

Layer dropout keeps FSDP's collectives matched: every process calls every decoder layer
(so the all-gather runs everywhere) and a layer skipped by all of a process's samples still
gives its parameters zero gradients (so the reduce-scatter runs everywhere too).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from self_speculation.distributed import DistributedContext
from self_speculation.errors import ConfigError

# Marks a decoder layer's forward as wrapped by apply_activation_checkpointing.
_CHECKPOINTED = "_activation_checkpointed"


def resolve_device(requested: str, context: DistributedContext) -> torch.device:
    """The device of this process: ``auto`` is the GPU of this local rank when there is one.

    Raises:
        ConfigError: a GPU was asked for and there is none.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested} but torch sees no CUDA device")
        index = context.local_rank if requested == "cuda" else int(requested.split(":")[1])
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


@contextlib.contextmanager
def single_process_group(needed: bool, device: torch.device) -> Iterator[None]:
    """A process group of one (in-memory store) when ``needed`` and none exists.

    FSDP needs a process group even on one device; ``python train.py --fsdp True`` then
    works without torchrun.
    """
    import torch.distributed as dist

    if not needed or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def apply_activation_checkpointing(layers: nn.ModuleList) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    The layer's ``forward`` is overridden on the instance (weights and ``state_dict`` keys are
    unchanged), so layer dropout, applied afterwards, decides its skips *outside* the
    recomputed region: the recomputation sees the same kept samples.
    """
    for layer in layers:
        if getattr(layer.forward, _CHECKPOINTED, False):
            continue
        forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        setattr(forward, _CHECKPOINTED, True)
        layer.forward = forward


def shard_with_fsdp(
    objective: nn.Module,
    layers: nn.ModuleList,
    device: torch.device,
    bf16: bool,
    cpu_offload: bool,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the objective as the root.

    Returns:
        The objective, now sharded in place (its parameters are DTensors).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ConfigError("--fsdp True needs a process group (see single_process_group)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    offload = CPUOffloadPolicy() if cpu_offload else None
    common: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
    if offload is not None:
        common["offload_policy"] = offload
    for layer in layers:
        fully_shard(layer, **common)
    # The root's inputs are token ids and noise: nothing to cast.
    root_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    fully_shard(objective, **{**common, "mp_policy": root_policy})
    return objective


def wrap_for_training(
    objective: nn.Module,
    layers: nn.ModuleList,
    device: torch.device,
    context: DistributedContext,
    fsdp: bool,
    bf16: bool,
    cpu_offload: bool = False,
) -> nn.Module:
    """The module the loop calls: sharded (FSDP2), replicated (DDP) or the objective itself."""
    if cpu_offload and device.type != "cuda":
        raise ConfigError(
            "--fsdp_cpu_offload True keeps a GPU run's shards in CPU memory; it needs a GPU"
        )
    if fsdp:
        return shard_with_fsdp(objective, layers, device, bf16, cpu_offload)
    objective.to(device)
    if context.world_size > 1:
        return nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    return objective


def compute_context(
    device: torch.device, bf16: bool, fsdp: bool
) -> contextlib.AbstractContextManager:
    """bf16 autocast around the forward pass, except under FSDP (its policy casts instead)."""
    if not bf16 or fsdp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def gradient_sync(trained: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient reduction of an accumulation micro-batch that is not the last."""
    if isinstance(trained, nn.parallel.DistributedDataParallel) and not sync:
        with trained.no_sync():
            yield
        return
    setter = getattr(trained, "set_requires_gradient_sync", None)  # FSDP2
    if setter is not None:
        setter(sync)
    yield


def full_state_dict(objective: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The objective's complete weights on CPU: on rank 0 when sharded (empty elsewhere).

    Every process must call this when ``sharded`` (it all-gathers).
    """
    if not sharded:
        return {name: tensor.detach().cpu() for name, tensor in objective.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(objective, options=options)
