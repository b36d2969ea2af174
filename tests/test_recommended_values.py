"""An adapter folder's recommended k is checked when the folder is read: a value that is not a
whole number >= 1 (JSON's true, 2.0) is refused there, naming the file and the value, not at
the first generation as a setting the user never gave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator
from self_speculation.draft import (
    ADAPTER_CONFIG_NAME,
    AdapterConfig,
    ExitAdapter,
    load_draft_exit,
    read_adapter_config,
    save_adapter,
)


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())


def _adapter_recommending(folder: Path, generator: Generator, num_speculations: object) -> Path:
    layerwise = generator.layerwise
    config = AdapterConfig(
        exit_layer=2,
        num_layers=layerwise.num_layers,
        hidden_size=layerwise.config.hidden_size,
        init_layer=layerwise.num_layers - 1,
    )
    save_adapter(folder, ExitAdapter(layerwise, 2), config, None)
    raw = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    raw["num_speculations"] = num_speculations
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("value", [True, 2.0, 0, -1, "3"], ids=["true", "2.0", "0", "-1", "str"])
def test_a_recommended_k_that_is_not_a_whole_number_is_refused_when_read(
    generator: Generator, tmp_path: Path, value: object
) -> None:
    folder = _adapter_recommending(tmp_path / "adapter", generator, value)
    with pytest.raises(ConfigError, match=r"adapter_config\.json: 'num_speculations' must be"):
        read_adapter_config(folder)
    with pytest.raises(ConfigError, match="num_speculations"):
        load_draft_exit(generator.layerwise, folder)


def test_a_recommended_k_is_used_when_the_run_gives_none(
    generator: Generator, tmp_path: Path
) -> None:
    """The check refuses nothing valid: null and whole numbers load, and k comes from there."""
    assert (
        read_adapter_config(_adapter_recommending(tmp_path / "none", generator, None)) is not None
    )
    folder = _adapter_recommending(tmp_path / "three", generator, 3)
    generator.draft = load_draft_exit(generator.layerwise, folder)
    try:
        config = GenerationConfig(generation_strategy="self_speculative", sample=False, max_steps=4)
        result = generator.generate([5, 6], config)
    finally:
        generator.draft = None
    assert (result.exit_layer, result.num_speculations) == (2, 3)


def test_a_recommended_exit_layer_beyond_the_model_is_named_as_the_models() -> None:
    """A generation config recommending an exit past the model's layers was reported as if
    the user had passed it ("exit_layer must be in [1, 4] for this model, got 7", with no
    --exit_layer given): the message names the recommendation and the flag that overrides it."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    model.generation_config.exit_layer = 7
    model.generation_config.num_speculations = 2
    generator = Generator(model, IdTokenizer())
    speculative = GenerationConfig(generation_strategy="self_speculative", sample=False)
    with pytest.raises(ConfigError, match=r"recommends exit_layer 7 .*pass --exit_layer"):
        generator.generate([5, 6], speculative)
    given = GenerationConfig(generation_strategy="self_speculative", exit_layer=9, sample=False)
    with pytest.raises(ConfigError, match=r"exit_layer must be in \[1, 4\] for this model, got 9"):
        generator.generate([5, 6], given)
    result = generator.generate([5, 6], GenerationConfig(sample=False, max_steps=2))
    assert result.exit_layer == 4  # autoregressive decoding never reads the recommendation
