"""A seeded sampled batch whose rows finish apart draws the same text whether steps are
issued ahead of the host's reads (the default on GPUs, without a streamer or stop words)
or read one by one (CPUs; stop words), with finished rows leaving the batch."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_repeating_model

from self_speculation import GenerationConfig, Generator

PROMPTS = [[3, 1, 4], [5, 6, 7, 8, 9], [2, 2], [1, 0, 1, 0]]
STOP = 0  # frequent in this 16-token model's samples: rows finish apart


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(make_repeating_model(), IdTokenizer())


def _sampled(generator: Generator, ahead: bool, seed: int, settings: dict, **config) -> list:
    generator.steps_ahead = ahead
    try:
        results = generator.generate_batch(
            PROMPTS,
            GenerationConfig(
                max_steps=20,
                sample=True,
                temperature=1.0,
                top_p=1.0,
                stop_token_ids=[STOP],
                **settings,
                **config,
            ),
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        generator.steps_ahead = None
    return [(r.token_ids, r.stop_reason) for r in results]


@pytest.mark.parametrize(
    "settings",
    [
        dict(generation_strategy="autoregressive"),
        dict(generation_strategy="self_speculative", exit_layer=1, num_speculations=3),
    ],
    ids=lambda s: s["generation_strategy"],
)
def test_sampled_rows_that_finish_apart_draw_alike_ahead_and_step_by_step(
    generator: Generator, settings: dict
) -> None:
    apart = 0
    for seed in range(6):
        step_by_step = _sampled(generator, False, seed, settings)
        apart += len({len(tokens) for tokens, _ in step_by_step}) > 1
        assert _sampled(generator, True, seed, settings) == step_by_step, seed
        # Stop words turn steps ahead off: a stop word that never comes changes nothing.
        assert _sampled(generator, True, seed, settings, stop_words=["99"]) == step_by_step
    assert apart >= 3  # rows finished apart, so finished rows left the batch
