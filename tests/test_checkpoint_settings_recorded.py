"""A checkpoint's generation_config.json changes the tokens (its repetition penalty, n-gram
size, bad words and suppressed tokens apply as in transformers' generate), but the result
documents recorded only the engine's GenerationConfig: two runs of one command on two
checkpoints that differ only there wrote identical settings and different outputs, with
nothing saying why. The environment now names the checkpoint's applied settings, and the
ones the engine left out (transformers' generate would apply them)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer, save_tiny_model
from transformers import GenerationConfig as CheckpointConfig

from self_speculation import GenerationConfig, Generator, ModelLoadError


def _generate_document(model_dir: Path, output: Path) -> dict:
    generate = importlib.import_module("generate")
    argv = [
        "--model", str(model_dir), "--prompt", "def add(a, b):", "--sample", "False",
        "--max_steps", "6", "--streamer", "none", "--output_dir", str(output),
    ]  # fmt: skip
    assert generate.main(argv) == 0
    (result,) = output.glob("generate_*.json")
    return json.loads(result.read_text())


def test_results_record_the_checkpoints_generation_settings(tmp_path: Path) -> None:
    plain = save_tiny_model(tmp_path / "plain")
    penalised = save_tiny_model(tmp_path / "penalised")
    checkpoint = CheckpointConfig.from_pretrained(penalised)
    checkpoint.repetition_penalty = 1.5
    checkpoint.suppress_tokens = [7]
    checkpoint.min_new_tokens = 3
    checkpoint.save_pretrained(penalised)

    before = _generate_document(plain, tmp_path / "out-plain")
    after = _generate_document(penalised, tmp_path / "out-penalised")
    assert before["generation_config"] == after["generation_config"]  # the engine's: alike
    assert before["environment"]["checkpoint_generation_settings"] == {"eos_token_id": 1}
    assert before["environment"]["checkpoint_settings_not_applied"] == []
    assert after["environment"]["checkpoint_generation_settings"] == {
        "repetition_penalty": 1.5,
        "suppress_tokens": [7],
        "eos_token_id": 1,
    }
    assert after["environment"]["checkpoint_settings_not_applied"] == ["min_new_tokens=3"]


def test_neutral_checkpoint_settings_are_not_recorded() -> None:
    from self_speculation.sampling import applied_checkpoint_settings

    neutral = CheckpointConfig(repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None)
    assert applied_checkpoint_settings(neutral) == {}
    assert applied_checkpoint_settings(None) == {}
    ngram = CheckpointConfig(no_repeat_ngram_size=3, eos_token_id=[1, 5])
    assert applied_checkpoint_settings(ngram) == {"no_repeat_ngram_size": 3, "eos_token_id": [1, 5]}


def test_an_eos_id_beyond_int64_is_one_line_at_load() -> None:
    """generation_config.json's eos_token_id [1, 10**20] passed the load-time check (a whole
    number) and crashed the first generation with a ValueError traceback (the stop ids'
    int64 tensor overflowed); it is a ModelLoadError when the Generator is made."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.generation_config.eos_token_id = [1, 10**20]
    with pytest.raises(ModelLoadError, match="whole numbers below 2\\*\\*62"):
        Generator(model, make_tiny_tokenizer()).generate([5, 6], GenerationConfig(max_steps=2))
    model.generation_config.eos_token_id = [1, -1]  # stops nothing, as in transformers
    result = Generator(model, make_tiny_tokenizer()).generate(
        [5, 6], GenerationConfig(max_steps=2, sample=False)
    )
    assert result.stop_reason in ("max_steps", "eos")


def test_an_eos_id_beyond_int64_in_generation_config_json_is_one_line(tmp_path: Path) -> None:
    generate = importlib.import_module("generate")
    model_dir = save_tiny_model(tmp_path / "model")
    path = model_dir / "generation_config.json"
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({**settings, "eos_token_id": [1, 10**20]}))
    argv = [
        "--model", str(model_dir), "--prompt", "def f(a):", "--max_steps", "4",
        "--streamer", "none", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    # A LayerSkipError: run_main prints it as one line (exit status 2), not a traceback.
    with pytest.raises(ModelLoadError, match="eos_token_id is \\[1, 100000000000000000000\\]"):
        generate.main(argv)


def test_a_replaced_checkpoint_ngram_size_is_not_recorded_as_applied(tmp_path: Path) -> None:
    """A run's own --no_repeat_ngram_size replaces the checkpoint's (``_context_processors``),
    but the document listed the checkpoint's as applied beside the run's: two n-gram sizes
    on file, one of them not used. Only what decoding applied is recorded."""
    from self_speculation.sampling import applied_checkpoint_settings

    checkpoint = CheckpointConfig(no_repeat_ngram_size=3, eos_token_id=1)
    own = GenerationConfig(no_repeat_ngram_size=4)
    assert applied_checkpoint_settings(checkpoint, [own]) == {"eos_token_id": 1}
    assert applied_checkpoint_settings(checkpoint, [GenerationConfig()]) == {
        "no_repeat_ngram_size": 3,
        "eos_token_id": 1,
    }
    model_dir = save_tiny_model(tmp_path / "model")
    saved = CheckpointConfig.from_pretrained(model_dir)
    saved.no_repeat_ngram_size = 3
    saved.save_pretrained(model_dir)
    generate = importlib.import_module("generate")
    argv = [
        "--model", str(model_dir), "--prompt", "def add(a, b):", "--sample", "False",
        "--max_steps", "6", "--streamer", "none", "--no_repeat_ngram_size", "4",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert generate.main(argv) == 0
    (result,) = (tmp_path / "out").glob("generate_*.json")
    document = json.loads(result.read_text())
    assert document["generation_config"]["no_repeat_ngram_size"] == 4
    assert document["environment"]["checkpoint_generation_settings"] == {"eos_token_id": 1}
