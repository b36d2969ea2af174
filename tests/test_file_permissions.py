"""Trained weights are as readable as every other file the scripts write.

safetensors' ``save_file`` (0.8) writes through a private temporary file, so a model exported
by train.py and an adapter written by train_adapter.py came out 0600 whatever the umask,
while the result documents (write_json_atomic) are 0644 under the usual 022.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB_SIZE, make_tiny_model, make_tiny_tokenizer

from self_speculation import Generator
from self_speculation.distributed import DistributedContext
from self_speculation.draft import ADAPTER_WEIGHTS_NAME, AdapterConfig, ExitAdapter, save_adapter
from self_speculation.training.checkpointing import export_pretrained


@pytest.fixture()
def usual_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("usual_umask")
def test_exported_model_weights_are_readable_by_others(tmp_path: Path) -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    export_pretrained(
        tmp_path, model, None, make_tiny_tokenizer(), model.generation_config, DistributedContext()
    )
    weights = tmp_path / "model.safetensors"
    assert weights.is_file()
    assert mode(weights) == 0o644, oct(mode(weights))
    assert mode(tmp_path / "config.json") == 0o644


@pytest.mark.usefixtures("usual_umask")
def test_saved_adapter_weights_are_readable_by_others(tmp_path: Path) -> None:
    generator = Generator(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer()
    )
    adapter = ExitAdapter(generator.layerwise, 2).requires_grad_(False)
    settings = AdapterConfig(exit_layer=2, num_layers=4, hidden_size=32, init_layer=3)
    save_adapter(tmp_path, adapter, settings, torch.arange(VOCAB_SIZE))
    weights = tmp_path / ADAPTER_WEIGHTS_NAME
    assert mode(weights) == 0o644, oct(mode(weights))


def test_a_private_umask_is_respected(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
        export_pretrained(
            tmp_path, model, None, make_tiny_tokenizer(), model.generation_config,
            DistributedContext(),
        )  # fmt: skip
    finally:
        os.umask(previous)
    assert mode(tmp_path / "model.safetensors") == 0o600


def test_the_umask_is_read_without_being_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the umask to 0 for a moment (the os.umask pair) would make another thread's
    new files writable by everyone: where /proc shows it, it is read instead."""
    from self_speculation import output_safety

    previous = os.umask(0o027)
    try:
        calls = []
        monkeypatch.setattr(output_safety.os, "umask", lambda mask: calls.append(mask) or 0)
        assert output_safety._umask() == 0o027
        assert calls == [] or not Path("/proc/self/status").exists()
    finally:
        monkeypatch.undo()
        os.umask(previous)
