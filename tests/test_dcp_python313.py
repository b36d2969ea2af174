"""A checkpoint written under Python 3.13 resumes.

Python 3.13 defines ``pathlib.PosixPath`` in ``pathlib._local`` and pickles it under that
name; DCP's ``.metadata`` holds the checkpoint's path (``StorageMeta.checkpoint_id``), so
the metadata unpickler, which allowed ``pathlib.PosixPath`` only, refused every checkpoint
written by Python 3.13 as "damaged or incomplete".
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from self_speculation.distributed import DistributedContext
from self_speculation.training.checkpointing import (
    CHECKPOINT_DIR,
    load_checkpoint,
    save_checkpoint,
)


class _Config:
    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / "config.json").write_text("{}")


def _as_python_313_writes_it(metadata_path: Path) -> None:
    """Rewrite ``.metadata`` naming its paths' class as Python 3.13's pickle does."""
    with open(metadata_path, "rb") as file:
        metadata = pickle.load(file)
    # Protocol 2 names a class in text (GLOBAL 'module\nname\n'), without frame lengths.
    data = pickle.dumps(metadata, protocol=2)
    assert b"cpathlib\nPosixPath\n" in data
    metadata_path.write_bytes(data.replace(b"cpathlib\n", b"cpathlib._local\n"))


def test_a_checkpoint_written_by_python_313_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_checkpoint(
        tmp_path, module, optimizer, {"progress": {"step": 1}}, _Config(), DistributedContext()
    )
    _as_python_313_writes_it(tmp_path / CHECKPOINT_DIR / ".metadata")
    restored = nn.Linear(3, 2)
    restored_optimizer = torch.optim.AdamW(restored.parameters())
    state = load_checkpoint(tmp_path, restored, restored_optimizer, DistributedContext())
    assert state["progress"] == {"step": 1}
    assert torch.equal(restored.weight, module.weight)
