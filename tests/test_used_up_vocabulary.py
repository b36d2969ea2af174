"""Sampling where the logits processors leave nothing to draw from: no_repeat_ngram_size 1
over a vocabulary the text has used up (and a repetition penalty that overflows the logits)
stops the row (stop_reason "non_finite_logits") with every kept token allowed, or refuses a
prompt in one line; it never fails inside torch.multinomial."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator

VOCAB = 16


@pytest.fixture(scope="module")
def generator() -> Generator:
    model = make_tiny_model(
        "llama_mha_untied",
        vocab_size=VOCAB,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        seed=1,
    )
    return Generator(model, IdTokenizer())


def config(strategy: str, **overrides) -> GenerationConfig:
    speculative = {} if strategy == "autoregressive" else dict(exit_layer=1, num_speculations=3)
    settings = dict(
        generation_strategy=strategy,
        sample=True,
        temperature=1.0,
        top_p=1.0,
        max_steps=3 * VOCAB,
        no_repeat_ngram_size=1,
    )
    return GenerationConfig(**{**settings, **speculative, **overrides})


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative", "adaptive"])
def test_sampling_stops_when_no_repeat_ngram_uses_up_the_vocabulary(
    generator: Generator, strategy: str
) -> None:
    prompts = [[3, 4, 5], [7]]
    for seed in range(3):
        rng = torch.Generator().manual_seed(seed)
        results = generator.generate_batch(prompts, config(strategy), generator=rng)
        for prompt, result in zip(prompts, results):
            assert result.stop_reason == "non_finite_logits"
            # Every token at most once, prompt included: all the vocabulary left, no more.
            assert len(set(prompt + result.token_ids)) == len(prompt + result.token_ids)
            assert sorted(prompt + result.token_ids) == list(range(VOCAB))


def test_a_prompt_that_used_up_the_vocabulary_is_one_config_error(
    generator: Generator,
) -> None:
    with pytest.raises(ConfigError, match="leave no token to follow the prompt"):
        generator.generate(list(range(VOCAB)), config("self_speculative"))


def test_a_repetition_penalty_that_overflows_the_logits_is_no_crash(
    generator: Generator,
) -> None:
    checkpoint = generator.model.generation_config
    saved = checkpoint.repetition_penalty
    checkpoint.repetition_penalty = 1e-40  # logits / 1e-40 overflow float32
    try:
        with pytest.raises(ConfigError, match="overflowed"):
            generator.generate([3, 4, 5], config("autoregressive", no_repeat_ngram_size=None))
    finally:
        checkpoint.repetition_penalty = saved
