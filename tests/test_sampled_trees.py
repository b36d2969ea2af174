"""Sampled token trees (``tree`` with ``sample=True``) keep the full model's distribution.

After each node the full model's choice is a draw from its warped distribution, nodes of
one depth drawing with the same number, and the walk follows the child that matches the
draw. Each kept token is then a draw from p given the tokens kept before it, whichever
drafts there were. Checked as the chains' sampling is (test_sampling_distribution.py):
a 12-token vocabulary whose joint distribution of the first 4 tokens is enumerated
exactly, exit 1 of 4 (drafts both kept and rejected), temperature, top-k and top-p all
active; 1000 seeded draws against the noise floor. When these tests were written, each
failed for an injected bug: every depth drawing with the first depth's number (joint TV
0.58 against a noise floor of 0.15), or the draws taken from the unwarped logits (0.91 of
the draws on sequences the warpers forbid)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_sampling_distribution import (
    LENGTH,
    MAX_STEPS,
    NUM_SPECULATIONS,
    OTHER_PROMPT,
    PROMPT,
    WARPERS,
    Tally,
    exact_joint,
    tiny_generator,
)

from self_speculation import GenerationConfig, Generator
from self_speculation.passes import COMPILE_BACKEND_VARIABLE

BRANCHING = [2, 2, 1]  # depth 3 = NUM_SPECULATIONS: the first step covers every position


def sampled_tree(compile: bool = False, **settings) -> GenerationConfig:
    return GenerationConfig(
        max_steps=MAX_STEPS,
        sample=True,
        generation_strategy="tree",
        exit_layer=1,
        tree_branching=BRANCHING,
        compile=compile,
        **{**WARPERS, **settings},
    )


@pytest.fixture(scope="module")
def generator() -> Generator:
    return tiny_generator()


def test_the_branching_covers_the_first_step() -> None:
    assert len(BRANCHING) == NUM_SPECULATIONS


@pytest.mark.slow
def test_one_prompt_matches_the_exact_distribution(generator: Generator) -> None:
    exact = exact_joint(generator.model, PROMPT, LENGTH)
    rng = torch.Generator().manual_seed(5)
    tally = Tally()
    for _ in range(1000):
        tally.add(generator.generate(PROMPT, sampled_tree(), generator=rng))
    tally.check(exact, "sampled tree")


@pytest.mark.slow
def test_batch_of_different_prompts_matches_each_rows_distribution(
    generator: Generator,
) -> None:
    """Left padding, rows accepting different paths: 500 batches, 1000 draws per prompt."""
    exact = {
        tuple(prompt): exact_joint(generator.model, prompt, LENGTH)
        for prompt in (PROMPT, OTHER_PROMPT)
    }
    rng = torch.Generator().manual_seed(6)
    tallies = {key: Tally() for key in exact}
    for _ in range(500):
        batch = generator.generate_batch([PROMPT, OTHER_PROMPT], sampled_tree(), generator=rng)
        for prompt, result in zip((PROMPT, OTHER_PROMPT), batch):
            tallies[tuple(prompt)].add(result)
    for key, tally in tallies.items():
        tally.check(exact[key], f"sampled tree, batch row {list(key)}")


@pytest.mark.slow
def test_compiled_sampled_trees_draw_eager_tokens_and_keep_the_distribution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path's tree step draws inside the compiled call, from the same numbers:
    eager decoding's tokens for a seed (traced with the eager backend)."""
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    reference = tiny_generator()
    generator = Generator(copy.deepcopy(reference.model).float(), reference.tokenizer)
    for seed in range(10):
        fast = generator.generate(
            PROMPT, sampled_tree(compile=True), generator=torch.Generator().manual_seed(seed)
        )
        eager = generator.generate(
            PROMPT, sampled_tree(), generator=torch.Generator().manual_seed(seed)
        )
        assert fast.token_ids == eager.token_ids, seed
    assert generator.fast_path_fallback(sampled_tree(compile=True)) is None
    exact = exact_joint(reference.model, PROMPT, LENGTH)
    rng = torch.Generator().manual_seed(7)
    tally = Tally()
    for _ in range(1000):
        tally.add(generator.generate(PROMPT, sampled_tree(compile=True), generator=rng))
    tally.check(exact, "compiled sampled tree")


def test_a_seed_gives_the_same_tokens_and_greedy_trees_are_unchanged() -> None:
    generator = tiny_generator()
    first, second = (
        generator.generate(PROMPT, sampled_tree(), generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    )
    assert first.token_ids == second.token_ids
    tree = generator.generate(
        PROMPT,
        GenerationConfig(
            max_steps=8, sample=False, generation_strategy="tree", exit_layer=1,
            tree_branching=BRANCHING,
        ),
    )  # fmt: skip
    plain = generator.generate(PROMPT, GenerationConfig(max_steps=8, sample=False))
    assert tree.token_ids == plain.token_ids
