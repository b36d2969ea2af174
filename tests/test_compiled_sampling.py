"""Sampling on the fast path (GenerationConfig(compile=True)): the compiled passes keep the
target distribution, and one self-speculative prompt draws eager decoding's tokens for a seed
(a single row draws its random numbers in eager order; docs/design.md).
The suite's sampled tests ran eagerly and its compiled tests greedy. Traced by dynamo with
the eager backend (the fast path's own steps, buffers and bookkeeping, not inductor's code
generation: seconds instead of minutes)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_sampling_distribution import (
    LENGTH,
    MAX_STEPS,
    NUM_SPECULATIONS,
    PROMPT,
    VOCAB,
    WARPERS,
    assert_matches,
    exact_joint,
    tiny_generator,
)

from self_speculation import GenerationConfig, Generator
from self_speculation.passes import COMPILE_BACKEND_VARIABLE


def sampled(strategy: str, compile: bool) -> GenerationConfig:
    return GenerationConfig(
        max_steps=MAX_STEPS,
        sample=True,
        generation_strategy=strategy,
        exit_layer=1,
        num_speculations=NUM_SPECULATIONS,
        compile=compile,
        **WARPERS,
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["self_speculative", "adaptive"])
def test_compiled_sampling_keeps_the_target_distribution(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    reference = tiny_generator()
    generator = Generator(copy.deepcopy(reference.model).float(), reference.tokenizer)
    compiled = sampled(strategy, compile=True)
    # One row: a seed draws what eager decoding draws (adaptive's cost model counts the
    # compiled passes' fixed cost, so it may choose other chains: the distribution only).
    for seed in range(10 if strategy == "self_speculative" else 0):
        fast = generator.generate(PROMPT, compiled, generator=torch.Generator().manual_seed(seed))
        eager = generator.generate(
            PROMPT, sampled(strategy, False), generator=torch.Generator().manual_seed(seed)
        )
        assert fast.token_ids == eager.token_ids, seed
    assert generator.fast_path_fallback(compiled) is None
    exact = exact_joint(reference.model, PROMPT, LENGTH)
    rng = torch.Generator().manual_seed(11)
    counts = torch.zeros([VOCAB] * LENGTH, dtype=torch.float64)
    drafted = accepted = 0
    for _ in range(1000):
        result = generator.generate(PROMPT, compiled, generator=rng)
        counts[tuple(result.token_ids[:LENGTH])] += 1
        drafted += result.num_drafted
        accepted += result.num_accepted
    assert 0.05 < accepted / drafted < 0.95
    assert_matches(counts / 1000, exact, 1000, f"compiled {strategy}")
