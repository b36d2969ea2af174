"""train.py --resume reads only tensors and plain values from a checkpoint.

A checkpoint's files are pickles: ``trainer_state.pt`` and ``rng-<rank>.pt`` were read with
``torch.load(weights_only=False)``, DCP's ``.metadata`` with ``pickle.load`` and its byte
items (the optimizer's param-group values) with ``torch.load(weights_only=False)``, so a
checkpoint from elsewhere ran whatever code it held on ``--resume True``. Each now refuses
in one line, running nothing, and an honest checkpoint still resumes exactly.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_checkpoint_and_data_invariants import _Config
from torch import nn

from self_speculation.distributed import DistributedContext
from self_speculation.errors import ConfigError
from self_speculation.training.checkpointing import (
    CHECKPOINT_DIR,
    TRAINER_STATE_FILE,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)


class _Payload:
    """Unpickling it creates ``marker`` (what a hostile checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


def _saved(tmp_path: Path) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    """A checkpoint after one optimizer step, so that the optimizer's state holds tensors."""
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(7)
    save_checkpoint(
        tmp_path, module, optimizer, {"progress": {"step": 1}}, _Config(), DistributedContext(),
        generator,
    )  # fmt: skip
    return module, optimizer, generator


def _refused(tmp_path: Path, marker: Path) -> None:
    module, optimizer = nn.Linear(3, 2), None
    optimizer = torch.optim.AdamW(module.parameters())
    with pytest.raises(ConfigError, match="damaged or incomplete"):
        load_checkpoint(tmp_path, module, optimizer, DistributedContext(), torch.Generator())
    assert not marker.exists(), "the checkpoint ran code"


def test_a_trainer_state_that_runs_code_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"progress": _Payload(marker)}, tmp_path / CHECKPOINT_DIR / TRAINER_STATE_FILE)
    with pytest.raises(ConfigError, match="damaged or incomplete"):
        read_trainer_state(tmp_path)
    assert not marker.exists(), "the checkpoint ran code"
    _refused(tmp_path, marker)


def test_random_states_that_run_code_are_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"torch": _Payload(marker)}, tmp_path / CHECKPOINT_DIR / "rng-0.pt")
    _refused(tmp_path, marker)


def test_dcp_metadata_that_runs_code_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    marker = tmp_path / "ran"
    with open(tmp_path / CHECKPOINT_DIR / ".metadata", "wb") as file:
        pickle.dump(_Payload(marker), file)
    _refused(tmp_path, marker)


def test_an_optimizer_value_that_runs_code_is_refused(tmp_path: Path) -> None:
    """DCP stores the param groups' values (lr, betas, ...) as pickled byte items."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    module, optimizer, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    model_state, optimizer_state = get_state_dict(module, optimizer)
    optimizer_state["param_groups"][0]["lr"] = _Payload(marker)
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state},
        checkpoint_id=str(tmp_path / CHECKPOINT_DIR),
    )
    _refused(tmp_path, marker)


def test_an_honest_checkpoint_restores_weights_optimizer_and_random_states(
    tmp_path: Path,
) -> None:
    module, optimizer, generator = _saved(tmp_path)
    expected_draw = torch.rand(4, generator=generator.clone_state())
    torch.manual_seed(1)
    restored = nn.Linear(3, 2)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=0.5, betas=(0.1, 0.2))
    other = torch.Generator().manual_seed(99)
    state = load_checkpoint(tmp_path, restored, restored_optimizer, DistributedContext(), other)
    assert state["progress"] == {"step": 1}
    assert torch.equal(restored.weight, module.weight)
    saved_group, restored_group = optimizer.param_groups[0], restored_optimizer.param_groups[0]
    assert (restored_group["lr"], restored_group["betas"]) == (
        saved_group["lr"],
        saved_group["betas"],
    )
    for parameter, restored_parameter in zip(module.parameters(), restored.parameters()):
        saved, loaded = optimizer.state[parameter], restored_optimizer.state[restored_parameter]
        assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
        assert torch.equal(saved["step"], loaded["step"])
    assert torch.equal(torch.rand(4, generator=other), expected_draw)
