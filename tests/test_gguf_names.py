"""A GGUF file is recognised by its content, not only by a lower-case ``.gguf`` name:
ollama keeps its models as extensionless ``sha256-...`` blobs, and a file named
``MODEL.GGUF`` is as much a GGUF file. Both were refused as "a file, not a model
directory" (the API and every script), though transformers loads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli_errors import run_in_process
from test_loading_forms import _write_gguf
from tiny_models import save_tiny_model

from self_speculation import load_model_and_tokenizer
from self_speculation.loading import is_gguf_file


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gguf-names")
    source = save_tiny_model(folder / "st", seed=3, initializer_range=0.2)
    _write_gguf(source, folder / "model.gguf")
    return folder / "model.gguf"


@pytest.mark.parametrize("name", ["sha256-6a0746a1ec1aef3e", "MODEL.GGUF"])
def test_a_gguf_file_under_another_name_loads_and_decodes_as_under_its_own(
    name: str, gguf_model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    renamed = tmp_path / name
    renamed.write_bytes(gguf_model.read_bytes())
    assert is_gguf_file(str(renamed))
    expected, _ = load_model_and_tokenizer(str(gguf_model))
    model, _ = load_model_and_tokenizer(str(renamed))
    assert torch.equal(model.model.embed_tokens.weight, expected.model.embed_tokens.weight)

    answers = []
    for path, output in ((gguf_model, "own"), (renamed, "renamed")):
        argv = ["--model", path, "--prompt", "hi", "--max_steps", 6, "--sample", False]
        argv += ["--generation_strategy", "self_speculative", "--exit_layer", 1]
        argv += ["--num_speculations", 2, "--output_dir", tmp_path / output]
        code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
        assert code == 0, stderr
        (document,) = (tmp_path / output).glob("generate_*.json")
        answers.append(json.loads(document.read_text())["prompts"][0]["text"])
    assert answers[0] == answers[1]


def test_other_files_are_not_taken_for_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"GGUX" + bytes(16))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "folder.gguf.d").mkdir()
    assert not is_gguf_file(str(tmp_path / "weights.bin"))
    assert not is_gguf_file(str(tmp_path / "empty"))
    assert not is_gguf_file(str(tmp_path / "folder.gguf.d"))
    assert not is_gguf_file(str(tmp_path / "missing"))
    assert is_gguf_file(str(tmp_path / "missing.gguf"))  # "GGUF file not found" at load
