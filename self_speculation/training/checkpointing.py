"""Checkpoints that resume exactly, and the final ``save_pretrained`` export.

A checkpoint is a directory ``output_dir/checkpoint`` written with
``torch.distributed.checkpoint`` (DCP): every process writes its own shard of the model and
optimizer state in parallel (no process ever holds the whole state when training with
FSDP), and DCP re-shards on load, so a run may resume on another number of processes.
Next to the shards:

* ``trainer_state.pt`` (rank 0): the scheduler, the progress (optimizer steps, tokens,
  data position, wall time, schedule horizon) and the world size that wrote it;
* ``rng-<rank>.pt``: each process's random states (torch CPU and CUDA, Python, the recipe's
  generator);
* ``config.json``: the model architecture (to rebuild it before loading the weights).

The directory is written under ``checkpoint.tmp``; then the previous checkpoint moves to
``checkpoint.old``, the new one into place, and the old one is deleted. A kill at any point
leaves one complete checkpoint, which ``recover_checkpoint`` puts back in place. On several
nodes ``output_dir`` must be on a file system every node sees.

A resume reads only tensors and plain values from these files (``torch.load(weights_only=True)``
and an allow-listed unpickler for DCP's ``.metadata``): a checkpoint from elsewhere can hold
wrong numbers, but it cannot run code.
"""

from __future__ import annotations

import logging
import pickle
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from self_speculation.distributed import DistributedContext, barrier
from self_speculation.errors import ConfigError, one_line, save_tokenizer
from self_speculation.output_safety import readable_by_others

logger = logging.getLogger("train")

CHECKPOINT_DIR = "checkpoint"
TEMPORARY_DIR = CHECKPOINT_DIR + ".tmp"  # a checkpoint being written
PREVIOUS_DIR = CHECKPOINT_DIR + ".old"  # the one it replaces, until it is in place
TRAINER_STATE_FILE = "trainer_state.pt"


def checkpoint_exists(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a complete checkpoint."""
    return (output_dir / CHECKPOINT_DIR / TRAINER_STATE_FILE).is_file()


def recover_checkpoint(output_dir: Path) -> None:
    """Finish a checkpoint replacement that a kill interrupted (main process only).

    ``checkpoint.tmp`` is renamed into place only once every process has written it, and
    the previous checkpoint moves to ``checkpoint.old`` just before: with ``checkpoint``
    missing, a ``checkpoint.old`` means the new one was complete; without it, the previous
    one is the one to keep.
    """
    final = output_dir / CHECKPOINT_DIR
    temporary, previous = output_dir / TEMPORARY_DIR, output_dir / PREVIOUS_DIR
    if not checkpoint_exists(output_dir):
        if previous.is_dir() and (temporary / TRAINER_STATE_FILE).is_file():
            temporary.rename(final)
        elif (previous / TRAINER_STATE_FILE).is_file():
            previous.rename(final)
        else:
            return
        logger.warning("recovered %s, which a kill left half-replaced", final)
    shutil.rmtree(previous, ignore_errors=True)


def _rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it saves "in a single process" when there is no process group: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed_state(objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter names (DTensor shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(objective, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(
    output_dir: Path,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    model_config: Any,
    context: DistributedContext,
    generator: torch.Generator | None = None,
) -> Path:
    """Write a checkpoint (every process must call this); returns its directory."""
    import torch.distributed.checkpoint as dcp

    final = output_dir / CHECKPOINT_DIR
    temporary, previous = output_dir / TEMPORARY_DIR, output_dir / PREVIOUS_DIR
    if context.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier(context)
    with _quiet_single_process():
        dcp.save(_distributed_state(objective, optimizer), checkpoint_id=str(temporary))
    torch.save(_rng_state(generator), temporary / f"rng-{context.rank}.pt")
    if context.is_main:
        model_config.save_pretrained(temporary)
        torch.save(
            {**trainer_state, "world_size": context.world_size}, temporary / TRAINER_STATE_FILE
        )
    barrier(context)
    if context.is_main:  # never without one complete checkpoint (``recover_checkpoint``)
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            final.rename(previous)
        temporary.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    barrier(context)
    return final


def _first_failure(error: BaseException) -> BaseException:
    """The error behind a DCP ``CheckpointException`` (whose message is every rank's
    traceback), else ``error`` itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = failures[min(failures)]
        if isinstance(wrapped, tuple) and wrapped and isinstance(wrapped[0], BaseException):
            return wrapped[0]
    return error


def damaged(directory: Path, error: BaseException) -> ConfigError:
    """The one-line error for a checkpoint that cannot be read."""
    return ConfigError(
        f"the checkpoint in {directory} is damaged or incomplete "
        f"({one_line(_first_failure(error))}); "
        "train again without --resume, or restore it from a copy"
    )


class _DropDcpMetadataFallback(logging.Filter):
    """DCP logs a traceback on the root logger for an unreadable ``.metadata`` before it
    tries the per-rank files and fails; the failure is reported in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(
            ("Global metadata is not found", "Rank local metadata is not found")
        )


@contextmanager
def _quiet_dcp_metadata_fallback() -> Iterator[None]:
    root, quiet = logging.getLogger(), _DropDcpMetadataFallback()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


# What DCP's ``.metadata`` pickle names (besides dtypes): its own records, never a callable
# that does something.
_DCP_METADATA_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata MetadataIndex StorageMeta BytesStorageMetadata TensorStorageMetadata "
            "TensorProperties ChunkStorageMetadata _MEM_FORMAT_ENCODING"
        ).split()
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """``pickle.load`` of a DCP ``.metadata`` file that refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "pathlib._local":  # where Python 3.13 defines (and pickles) PosixPath
            module = "pathlib"
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _DCP_METADATA_GLOBALS and not dtype:
            raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")
        return super().find_class(module, name)


def _dcp_load(state: dict[str, Any], directory: Path) -> None:
    """``dcp.load(state)`` from ``directory``, unpickling only DCP's metadata records and,
    for its byte items (the optimizer's param-group values), plain values: DCP itself
    unpickles both with no restriction."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")  # DCP's rank-local fallback: ``__<rank>.metadata``
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            with open(directory / name, "rb") as file:
                metadata = _DcpMetadataUnpickler(file).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            torch.load(value, weights_only=True)  # raises on anything but plain values
            value.seek(0)
            super().load_bytes(read_item, value)

    dcp.load(state, storage_reader=Reader(directory), planner=Planner())


def read_trainer_state(output_dir: Path) -> dict[str, Any]:
    """The checkpoint's trainer state (progress, scheduler, the run's settings).

    Raises:
        ConfigError: the file is damaged.
    """
    path = output_dir / CHECKPOINT_DIR / TRAINER_STATE_FILE
    try:
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or "progress" not in state:
            raise ValueError("no training progress in it")
    except Exception as error:  # unpickling raises anything
        raise damaged(path.parent, error) from None
    return state


def load_checkpoint(
    output_dir: Path,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    context: DistributedContext,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Load model, optimizer and random states in place; returns the trainer state.

    Random states are restored exactly when the world size is the one that saved; on another
    world size each process keeps its seeded states (the recipe's per-sample draws do not
    depend on them, see :mod:`self_speculation.training.loop`).
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    directory = output_dir / CHECKPOINT_DIR
    state = _distributed_state(objective, optimizer)
    try:
        with _quiet_single_process(), _quiet_dcp_metadata_fallback():
            _dcp_load(state, directory)
        set_state_dict(
            objective,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        trainer_state = read_trainer_state(output_dir)
        rng_file = directory / f"rng-{context.rank}.pt"
        restore_rng = trainer_state.get("world_size") == context.world_size and rng_file.is_file()
        if restore_rng:
            _set_rng_state(torch.load(rng_file, weights_only=True), generator)
    except ConfigError:
        raise
    # Whatever a truncated or missing file makes torch raise; DCP wraps its readers' errors
    # in a CheckpointException, which is a BaseException.
    except (Exception, CheckpointException) as error:
        raise damaged(directory, error) from None
    if not restore_rng and trainer_state.get("world_size") != context.world_size:
        if context.is_main:
            logger.warning(
                "checkpoint written by %s processes, resuming on %d: random states start afresh",
                trainer_state.get("world_size"),
                context.world_size,
            )
    elif not restore_rng:  # each process says which of its files is gone
        logger.warning("%s is missing: this process's random states start afresh", rng_file)
    if dist.is_initialized():
        dist.barrier()
    return trainer_state


def export_pretrained(
    output_dir: Path,
    model: nn.Module,
    weights: dict[str, torch.Tensor] | None,
    tokenizer: Any,
    generation_config: Any,
    context: DistributedContext,
) -> None:
    """The final model as a ``save_pretrained`` directory (bf16 safetensors), from rank 0.

    Args:
        output_dir: where to write.
        model: the trained model (unsharded), or under FSDP the sharded one, used only for
            its config.
        weights: under FSDP, the full weights gathered on rank 0 (keys of ``model``); None
            when ``model`` itself holds them.
        tokenizer: saved alongside.
        generation_config: the model's generation config (recommended exit and draft length).
        context: only rank 0 writes.
    """
    if context.is_main:
        if weights is None:
            final = model.eval().to(torch.bfloat16)
        else:
            from self_speculation.loading import auto_model_class  # noqa: PLC0415

            final = auto_model_class(model.config).from_config(model.config, dtype=torch.bfloat16)
            missing, unexpected = final.load_state_dict(weights, strict=False)
            final.tie_weights()
            tied = {name for name in missing if name.endswith("lm_head.weight")}
            if set(missing) - tied or unexpected:
                raise RuntimeError(
                    f"export: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
                )
            final.eval()
        final.config.dtype = torch.bfloat16
        final.generation_config = generation_config
        final.save_pretrained(output_dir)
        save_tokenizer(tokenizer, output_dir)
        readable_by_others(output_dir)
    barrier(context)
