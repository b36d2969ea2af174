"""Promises of the Python API's docstrings."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, LayerSkipError, Streamer

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.mark.parametrize(("exit_layer", "num_speculations"), [(2, -1), ("2", 3), (2, 0), (2, 2.0)])
def test_recommended_settings_from_python_are_one_error(tokenizer, exit_layer, num_speculations):
    """A generation config changed in Python (or a model not loaded through
    load_model_and_tokenizer, which checks generation_config.json) that recommends
    num_speculations -1 decoded with k = -1 (RuntimeError: narrow()), and exit_layer "2"
    raised a bare TypeError: a LayerSkipError naming the generation config instead."""
    model = make_tiny_model("llama_mha_untied", seed=2, dtype=torch.float64)
    model.generation_config.exit_layer = exit_layer
    model.generation_config.num_speculations = num_speculations
    config = GenerationConfig(generation_strategy="self_speculative", sample=False, max_steps=5)
    with pytest.raises(LayerSkipError, match="generation config recommends"):
        Generator(model, tokenizer).generate(PROMPT, config)


def test_autoregressive_result_reports_no_speculations(tokenizer):
    """GenerationResult.num_speculations is "the setting actually used": autoregressive
    decoding drafts nothing, whether or not the config names a k."""
    generator = Generator(make_tiny_model("llama_mha_untied", seed=2), tokenizer)
    for k in (-1, 3):
        config = GenerationConfig(sample=False, max_steps=4, num_speculations=k)
        result = generator.generate(PROMPT, config)
        assert (result.num_drafted, result.num_speculations) == (0, 0)


def test_on_step_calls(tokenizer):
    """Streamer.on_step: once for the first token, then once per counted step."""
    calls = []

    class Recorder(Streamer):
        def on_step(self, new_tokens, draft_tokens, accepted_count):
            calls.append((new_tokens, draft_tokens))

    generator = Generator(make_tiny_model("llama_mha_untied", seed=2), tokenizer)
    config = GenerationConfig(
        generation_strategy="self_speculative", exit_layer=1, num_speculations=3,
        sample=False, max_steps=13,
    )  # fmt: skip
    result = generator.generate(PROMPT, config, streamer=Recorder())
    assert len(calls) == result.num_steps + 1
    assert calls[0][1] == []
