"""Checkpoint recovery and random states, the training data's files and blocks, and where
a process trains: invariants that hand mutations of self_speculation/training/ showed no
fast test pinned (train.py's end-to-end resume tests take minutes)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from self_speculation.distributed import DistributedContext
from self_speculation.errors import ConfigError
from self_speculation.training import distributed_setup
from self_speculation.training.checkpointing import (
    CHECKPOINT_DIR,
    PREVIOUS_DIR,
    TEMPORARY_DIR,
    TRAINER_STATE_FILE,
    checkpoint_exists,
    load_checkpoint,
    recover_checkpoint,
    save_checkpoint,
)
from self_speculation.training.data import pack_blocks, read_texts, resolve_files

# ----------------------------------------------------------------------------- checkpoints


def _half_written(directory: Path, step: int, complete: bool = True) -> None:
    """A checkpoint folder whose rank-0 state is written (last, after the shards) or not."""
    directory.mkdir(parents=True)
    (directory / "shard").write_text(str(step))
    if complete:
        (directory / TRAINER_STATE_FILE).write_text(str(step))


def test_a_kill_before_the_first_checkpoint_is_in_place_recovers_nothing(tmp_path: Path) -> None:
    """Rank 0 writes its state before the other ranks have finished their shards: a
    ``checkpoint.tmp`` with no ``checkpoint.old`` beside it was never known complete."""
    _half_written(tmp_path / TEMPORARY_DIR, 5)
    recover_checkpoint(tmp_path)
    assert not checkpoint_exists(tmp_path)


def test_a_kill_between_the_two_renames_puts_the_new_checkpoint_in_place(tmp_path: Path) -> None:
    _half_written(tmp_path / PREVIOUS_DIR, 4)
    _half_written(tmp_path / TEMPORARY_DIR, 5)
    recover_checkpoint(tmp_path)
    assert (tmp_path / CHECKPOINT_DIR / "shard").read_text() == "5"
    assert not (tmp_path / PREVIOUS_DIR).exists()  # the replaced one is deleted


def test_a_kill_while_the_new_checkpoint_is_written_keeps_the_previous(tmp_path: Path) -> None:
    _half_written(tmp_path / PREVIOUS_DIR, 4)
    _half_written(tmp_path / TEMPORARY_DIR, 5, complete=False)
    recover_checkpoint(tmp_path)
    assert (tmp_path / CHECKPOINT_DIR / "shard").read_text() == "4"
    assert not (tmp_path / PREVIOUS_DIR).exists()


class _Config:
    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "config.json").write_text("{}")


def _saved(tmp_path: Path) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    """A checkpoint of a small module, its optimizer and a recipe generator, by one process."""
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    generator = torch.Generator().manual_seed(7)
    torch.rand(5, generator=generator)
    save_checkpoint(
        tmp_path, module, optimizer, {"progress": {"step": 1}}, _Config(), DistributedContext(),
        generator,
    )  # fmt: skip
    return module, optimizer, generator


def test_a_resume_on_as_many_processes_restores_every_random_state(tmp_path: Path) -> None:
    module, optimizer, generator = _saved(tmp_path)
    expected = torch.rand(4, generator=generator.clone_state()), torch.rand(4)
    torch.manual_seed(123)
    other = torch.Generator().manual_seed(99)
    state = load_checkpoint(tmp_path, module, optimizer, DistributedContext(), other)
    assert state["world_size"] == 1
    assert torch.equal(torch.rand(4, generator=other), expected[0])
    assert torch.equal(torch.rand(4), expected[1])


def test_a_resume_on_another_number_of_processes_keeps_its_seeded_states(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 0 of two reading a one-process checkpoint: the saved states belong to another
    layout, so the seeded ones stay (and the main process says so)."""
    module, optimizer, _ = _saved(tmp_path)
    seeded = torch.Generator().manual_seed(99)
    expected = torch.rand(4, generator=seeded.clone_state())
    with caplog.at_level(logging.WARNING, logger="train"):
        load_checkpoint(tmp_path, module, optimizer, DistributedContext(0, 2), seeded)
    assert torch.equal(torch.rand(4, generator=seeded), expected)
    assert "random states start afresh" in caplog.text


# ----------------------------------------------------------------------------- where it runs


def test_bf16_is_autocast_without_fsdp_and_fsdps_own_policy_with_it() -> None:
    cpu = torch.device("cpu")
    assert isinstance(distributed_setup.compute_context(cpu, True, False), torch.autocast)
    assert not isinstance(distributed_setup.compute_context(cpu, True, True), torch.autocast)
    assert not isinstance(distributed_setup.compute_context(cpu, False, False), torch.autocast)


def test_fsdp_reduces_gradients_only_on_the_last_micro_batch() -> None:
    class Sharded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[bool] = []

        def set_requires_gradient_sync(self, sync: bool) -> None:
            self.calls.append(sync)

    trained = Sharded()
    for sync in (False, False, True):
        with distributed_setup.gradient_sync(trained, sync):
            pass
    assert trained.calls == [False, False, True]


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 3 of 4 on two nodes of two GPUs is local rank 1: cuda:1 (its rank is no GPU)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    context = DistributedContext(rank=3, world_size=4, local_rank=1)
    assert distributed_setup.resolve_device("cuda", context) == torch.device("cuda", 1)
    assert distributed_setup.resolve_device("auto", context) == torch.device("cuda", 1)
    assert chosen == [1, 1]


def test_activation_checkpointing_applied_twice_recomputes_a_layer_once() -> None:
    layers = nn.ModuleList([nn.Linear(2, 2)])
    distributed_setup.apply_activation_checkpointing(layers)
    wrapped = layers[0].forward
    distributed_setup.apply_activation_checkpointing(layers)
    assert layers[0].forward is wrapped
    assert not isinstance(wrapped.args[0], type(wrapped))  # checkpoint(the layer's forward)


def test_cpu_offload_without_a_gpu_is_one_line() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="needs a GPU"):
        distributed_setup.wrap_for_training(
            model, nn.ModuleList([model]), torch.device("cpu"), DistributedContext(),
            fsdp=False, bf16=False, cpu_offload=True,
        )  # fmt: skip


# ----------------------------------------------------------------------------- data


def test_a_file_reached_through_a_symlink_counts_once_under_its_smallest_name(
    tmp_path: Path,
) -> None:
    real = tmp_path / "a.txt"
    real.write_text("x")
    (tmp_path / "z.txt").symlink_to(real)
    assert resolve_files([str(tmp_path / "z.txt"), str(tmp_path / "a.txt")]) == [real]


def test_an_upper_case_gzipped_jsonl_file_is_read_as_records(tmp_path: Path) -> None:
    path = tmp_path / "DATA.JSONL.GZ"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert list(read_texts([path])) == ["one", "two"]


def test_blank_and_binary_files_are_no_documents(tmp_path: Path) -> None:
    blank, binary, text = tmp_path / "blank.py", tmp_path / "binary.dat", tmp_path / "text.py"
    blank.write_text(" \n\t\n")
    binary.write_bytes(b"ab\0cd")  # valid UTF-8, but a NUL: not text
    text.write_text("print(1)\n")
    assert list(read_texts([blank, binary, text])) == ["print(1)\n"]


class _LengthTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[10 + len(text)] * len(text) for text in texts]}


def test_packing_drops_the_tail_shorter_than_a_block() -> None:
    # <bos> 13 13 13 <eos> <bos> 12 12 <eos>: 9 tokens, 2 blocks of 4; the last <eos> goes.
    blocks = pack_blocks(_LengthTokenizer(), ["abc", "de"], seq_len=4)
    assert blocks.tolist() == [[1, 13, 13, 13], [2, 1, 12, 12]]
    assert pack_blocks(_LengthTokenizer(), ["abcde"], seq_len=4).tolist() == [[1, 15, 15, 15]]
