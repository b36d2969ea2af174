"""The Generator reads the model's recommended exit layer and k at each generation.

Its EOS ids are read at each generation (as transformers' ``generate`` reads them); the
recommendation (``model.generation_config.exit_layer`` / ``num_speculations``) was read once,
when the Generator was made: one set afterwards was refused as "the model recommends none",
and one changed afterwards decoded with the old setting (another exit layer in the result,
other sampled text for a seed) where a new Generator on the same model used the new one.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, LayerSkipError

PROMPT = "def add(a, b):"
RECOMMENDED = GenerationConfig(generation_strategy="self_speculative", sample=True, max_steps=12)


def _run(generator: Generator) -> tuple[list[int], int, int]:
    result = generator.generate(PROMPT, RECOMMENDED, generator=torch.Generator().manual_seed(0))
    return result.token_ids, result.exit_layer, result.num_speculations


def _model() -> torch.nn.Module:
    return make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)


def test_a_recommendation_set_after_the_generator_was_made_is_followed() -> None:
    model = _model()
    kept = Generator(model, make_tiny_tokenizer())
    with pytest.raises(LayerSkipError, match="recommends none"):
        _run(kept)
    model.generation_config.exit_layer = 1
    model.generation_config.num_speculations = 2
    fresh = Generator(model, make_tiny_tokenizer())
    assert _run(kept) == _run(fresh)
    assert kept.recommended_exit_layer == 1


def test_a_recommendation_changed_after_the_generator_was_made_is_followed() -> None:
    model = _model()
    model.generation_config.exit_layer = 3
    model.generation_config.num_speculations = 4
    kept = Generator(model, make_tiny_tokenizer())
    assert _run(kept)[1:] == (3, 4)
    model.generation_config.exit_layer = 1
    model.generation_config.num_speculations = 2
    fresh = Generator(model, make_tiny_tokenizer())
    assert _run(kept) == _run(fresh)
    assert _run(kept)[1:] == (1, 2)


def test_a_malformed_recommendation_set_afterwards_is_one_error() -> None:
    model = _model()
    kept = Generator(model, make_tiny_tokenizer())
    model.generation_config.exit_layer = "2"
    model.generation_config.num_speculations = 2
    with pytest.raises(LayerSkipError, match="generation config recommends exit_layer '2'"):
        _run(kept)
