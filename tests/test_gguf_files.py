"""A GGUF file is loaded from its own path whatever the working directory holds, and in
every block type transformers loads (Q5_0 too) and decodes as transformers does; one
damaged in its metadata is refused in one line naming the file, not as a traceback from
transformers' GGUF reader, as is a malformed generation_config.json beside it; a part of
a split GGUF model is refused as that."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_errors import run_in_process
from test_loading_forms import _write_gguf
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from arguments import EXIT_ERROR
from self_speculation import GenerationConfig, Generator, load_model_and_tokenizer
from self_speculation.errors import ModelLoadError

GGUF_UINT16, GGUF_UINT32, GGUF_STRING = 2, 4, 8


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf_header(path: Path, key: str, kind: int, value: bytes) -> Path:
    """A GGUF v3 header of a Llama without tensors, with metadata ``key`` of type ``kind``."""
    path.write_bytes(
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 2)  # version, tensors, metadata entries
        + _text("general.architecture") + struct.pack("<I", GGUF_STRING) + _text("llama")
        + _text(key) + struct.pack("<I", kind) + value
    )  # fmt: skip
    return path


def _gguf_with_alignment(path: Path, alignment: int | str) -> Path:
    if isinstance(alignment, str):
        return _gguf_header(path, "general.alignment", GGUF_STRING, _text(alignment))
    return _gguf_header(path, "general.alignment", GGUF_UINT32, struct.pack("<I", alignment))


@pytest.mark.parametrize("alignment", [0, "32"])
def test_a_gguf_whose_alignment_is_not_a_positive_number_is_one_error(
    alignment: int | str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """general.alignment 0 was a ZeroDivisionError traceback, a string a TypeError one."""
    model = _gguf_with_alignment(tmp_path / "damaged.gguf", alignment)
    with pytest.raises(ModelLoadError, match="general.alignment is not a positive whole"):
        load_model_and_tokenizer(str(model))
    argv = ["--model", model, "--prompt", "hi", "--max_steps", 2, "--output_dir", tmp_path / "o"]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR, stderr
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if "generate.py: error:" in line]
    assert f"{model} is not a valid GGUF file" in error


def test_a_gguf_file_loads_from_its_path_when_the_working_directory_has_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers reads a bare gguf_file name from the working directory first: run from
    a folder holding another model.gguf, --model ../b/model.gguf decoded that one, silently
    (its config and tokenizer came from b/, so nothing disagreed)."""
    for name, seed in (("a", 1), ("b", 2)):
        source = save_tiny_model(tmp_path / f"{name}-st", seed=seed, initializer_range=0.2)
        (tmp_path / name).mkdir()
        _write_gguf(source, tmp_path / name / "model.gguf")
    expected = load_file(tmp_path / "b-st" / "model.safetensors")["model.embed_tokens.weight"]
    monkeypatch.chdir(tmp_path / "a")
    model, _ = load_model_and_tokenizer(str(tmp_path / "b" / "model.gguf"))
    assert torch.equal(model.model.embed_tokens.weight, expected)


def test_a_part_of_a_split_gguf_model_is_refused_as_one(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The first part was refused as missing weights ("the GGUF file's metadata and the
    weights disagree"), the others as corrupt files ("Copy it again")."""
    first = _gguf_header(tmp_path / "renamed.gguf", "split.count", GGUF_UINT16, b"\x02\x00")
    with pytest.raises(ModelLoadError, match=r"part 1 of 2 of a GGUF model split across"):
        load_model_and_tokenizer(str(first))
    later = tmp_path / "model-00002-of-00003.gguf"
    later.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 4, 0))  # no general.architecture
    argv = ["--model", later, "--prompt", "hi", "--max_steps", 2, "--output_dir", tmp_path / "o"]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR, stderr
    (error,) = [line for line in stderr.splitlines() if "generate.py: error:" in line]
    assert f"{later} is part 2 of 3 of a GGUF model split across files" in error
    assert "llama-gguf-split --merge" in error


def test_a_malformed_generation_config_beside_a_gguf_file_is_one_error(tmp_path: Path) -> None:
    """The folder of a GGUF file is its model's name_or_path, whose generation_config.json
    is read for a recommended exit: not being checked at load (as a model folder's is), a
    malformed one was a JSONDecodeError traceback when the Generator was made."""
    source = save_tiny_model(tmp_path / "st", initializer_range=0.2)
    (tmp_path / "gguf").mkdir()
    _write_gguf(source, tmp_path / "gguf" / "model.gguf")
    (tmp_path / "gguf" / "generation_config.json").write_text('{"exit_layer": 2,')
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "gguf" / "model.gguf"))
    with pytest.raises(ModelLoadError, match=r"generation_config\.json is not valid JSON"):
        Generator(model, tokenizer)


@pytest.mark.parametrize("block_type", ["Q5_0", "Q5_1"])
def test_a_gguf_file_of_block_types_transformers_reads_through_gguf_decodes_as_it_does(
    block_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' own GGUF reader (which check_gguf_file used for the tensor sizes)
    knows no Q5_0 or Q5_1; the gguf package, which loads a Llama, does: such a file, or a
    Q4_K_M file with Q5_0 fallback rows, was refused as "not a valid GGUF file"."""
    gguf = pytest.importorskip("gguf")
    kind = getattr(gguf.GGMLQuantizationType, block_type)
    add_tensor = gguf.GGUFWriter.add_tensor

    def quantized(writer, name: str, tensor, **kwargs) -> None:
        if tensor.ndim == 2:  # the norms stay float32, as llama.cpp keeps them
            tensor, kwargs = gguf.quants.quantize(tensor, kind), {"raw_dtype": kind}
        add_tensor(writer, name, tensor, **kwargs)

    source = save_tiny_model(tmp_path / "st", initializer_range=0.2)
    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_tensor", quantized)
        _write_gguf(source, tmp_path / "model.gguf")
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "model.gguf"))
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="model.gguf", dtype=torch.float32
    )
    generator = Generator(model, tokenizer)
    prompt = generator.encode("def add(a, b):")
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    plain = GenerationConfig(sample=False, max_steps=12)
    drafted = GenerationConfig(
        generation_strategy="self_speculative", sample=False, max_steps=12,
        exit_layer=2, num_speculations=3,
    )  # fmt: skip
    assert generator.generate(prompt, plain).token_ids == expected[0, len(prompt) :].tolist()
    assert generator.generate(prompt, drafted).token_ids == expected[0, len(prompt) :].tolist()
