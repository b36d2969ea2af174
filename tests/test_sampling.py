"""Acceptance rules and sampling reproduce the target distribution."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.sampling import TokenSelector, greedy_accept, speculative_accept


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_greedy_accept_takes_the_longest_agreeing_prefix_then_the_target_token() -> None:
    drafts = torch.tensor([4, 5, 6])
    assert greedy_accept(drafts, torch.tensor([4, 5, 6, 9])) == (3, 9)  # bonus token
    assert greedy_accept(drafts, torch.tensor([4, 7, 6, 9])) == (1, 7)  # correction
    assert greedy_accept(drafts, torch.tensor([1, 5, 6, 9])) == (0, 1)
    assert greedy_accept(drafts[:0], torch.tensor([3])) == (0, 3)  # no drafts: plain step


@pytest.mark.parametrize("num_drafts", [1, 3])
def test_speculative_accept_outputs_follow_the_target_distribution(num_drafts: int) -> None:
    """First kept token ~ p_0 and, where the first draft survives, second ~ p_1."""
    vocab, draws = 5, 30_000
    source = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(num_drafts + 1, vocab, generator=source) * 2, -1)
    draft = torch.softmax(torch.randn(num_drafts, vocab, generator=source) * 2, -1)
    rng = torch.Generator().manual_seed(1)
    first = torch.zeros(vocab)
    accepted_total = 0
    for _ in range(draws):
        drafts = torch.multinomial(draft, 1, generator=rng)[:, 0]  # [k]
        accepted_count, next_token = speculative_accept(drafts, draft, target, rng)
        kept = drafts[:accepted_count].tolist() + [next_token]
        first[kept[0]] += 1
        accepted_total += accepted_count
    # The expected acceptance of the first draft is sum_x min(p, q).
    expected_first_acceptance = float(torch.minimum(target[0], draft[0]).sum())
    assert total_variation(first / draws, target[0]) < 0.015  # sampling noise ~0.005
    assert accepted_total / draws >= expected_first_acceptance - 0.02


def test_speculative_accept_with_identical_distributions_accepts_everything() -> None:
    probs = torch.softmax(torch.randn(4, 7), -1)
    drafts = torch.tensor([1, 2, 3])
    accepted_count, _ = speculative_accept(
        drafts, probs[:3], probs, torch.Generator().manual_seed(0)
    )
    assert accepted_count == 3


def test_selector_processors_see_the_whole_sequence() -> None:
    config = GenerationConfig(sample=False, no_repeat_ngram_size=2)
    selector = TokenSelector(config)
    logits = torch.zeros(2, 2, 6)
    logits[..., 3] = 5.0  # token 3 is everyone's favourite
    # Row 0 is [3, 1, 2, 3, 1]; row 1 is [5, 2, 5] behind two pads (also id 5).
    context = torch.tensor([[3, 1, 2, 3, 1], [5, 5, 5, 2, 5]])
    processed = selector.process(context, torch.tensor([0, 2]), logits)
    # row 0, position 0 follows [3, 1, 2, 3]: "3 1" was seen, 1 is banned
    assert torch.isinf(processed[0, 0]).nonzero().flatten().tolist() == [1]
    # row 0, position 1 follows [3, 1, 2, 3, 1]: "1 2" was seen, 2 is banned
    assert torch.isinf(processed[0, 1]).nonzero().flatten().tolist() == [2]
    # row 1, position 0 follows [5, 2]: nothing to ban
    assert not torch.isinf(processed[1, 0]).any()
    # row 1, position 1 follows [5, 2, 5]: bans 2; "5 5" was padding and bans nothing
    assert torch.isinf(processed[1, 1]).nonzero().flatten().tolist() == [2]


class IdTokenizer:
    """Just enough tokenizer for the generator: ids in, ids out, no end-of-sequence."""

    eos_token_id = None
    pad_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [int(part) for part in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def four_token_generator() -> Generator:
    model = make_tiny_model(
        "llama_mha_untied",
        vocab_size=4,
        num_hidden_layers=3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        seed=3,
    )
    with torch.no_grad():  # sharpen the head so that p is far from uniform and from q
        model.lm_head.weight.mul_(6.0)
    return Generator(model, IdTokenizer())


def exact_joint(generator: Generator, prompt: list[int], length: int) -> torch.Tensor:
    """P(t1..t_length | prompt) of the full model at temperature 1, by enumeration."""
    vocab = 4
    joint = torch.zeros([vocab] * length, dtype=torch.float64)
    for sequence in itertools.product(range(vocab), repeat=length):
        ids = torch.tensor([prompt + list(sequence)])
        probs = torch.softmax(generator.layerwise.logits(ids)[0].double(), -1)
        p = 1.0
        for i, token in enumerate(sequence):
            p *= float(probs[len(prompt) - 1 + i, token])
        joint[sequence] = p
    return joint


@pytest.mark.slow
def test_self_speculative_sampling_matches_the_full_model_distribution(
    four_token_generator: Generator,
) -> None:
    """Joint of the first 3 sampled tokens (64 outcomes), 3000 seeded draws per strategy.

    With n = 3000 the expected total-variation distance of an empirical joint from the
    truth is about 0.5 * sqrt(2 / (pi n)) * sum sqrt(p) < 0.05; we allow 0.09, and 0.04
    on each position's marginal (4 outcomes, expected noise < 0.015).
    """
    prompt, length, draws = [2, 1, 3], 3, 3000
    exact = exact_joint(four_token_generator, prompt, length)
    settings = dict(max_steps=length, sample=True, temperature=1.0, top_p=1.0)
    configs = {
        "autoregressive": GenerationConfig(**settings),
        "self_speculative": GenerationConfig(
            **settings, generation_strategy="self_speculative", exit_layer=1, num_speculations=2
        ),
    }
    rng = torch.Generator().manual_seed(0)
    for name, config in configs.items():
        counts = torch.zeros_like(exact)
        drafted = accepted = 0
        for _ in range(draws):
            result = four_token_generator.generate(prompt, config, generator=rng)
            counts[tuple(result.token_ids)] += 1
            drafted += result.num_drafted
            accepted += result.num_accepted
        empirical = counts / draws
        assert total_variation(empirical, exact) < 0.09, name
        for axis in range(length):
            others = tuple(a for a in range(length) if a != axis)
            assert total_variation(empirical.sum(others), exact.sum(others)) < 0.04, (name, axis)
        if name == "self_speculative":
            assert drafted > 0 and 0 < accepted < drafted  # drafts were both kept and rejected


def test_seeded_sampling_is_reproducible(four_token_generator: Generator) -> None:
    config = GenerationConfig(
        max_steps=12,
        sample=True,
        temperature=1.0,
        generation_strategy="self_speculative",
        exit_layer=1,
        num_speculations=3,
    )
    runs = [
        four_token_generator.generate([2, 1], config, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    other = four_token_generator.generate(
        [2, 1], config, generator=torch.Generator().manual_seed(8)
    )
    assert runs[0].token_ids == runs[1].token_ids
    assert len(runs[0].token_ids) == 12
    assert other.token_ids != runs[0].token_ids or other.num_accepted != runs[0].num_accepted


@pytest.mark.slow
def test_batched_speculative_sampling_keeps_each_rows_distribution(
    four_token_generator: Generator,
) -> None:
    """Row 0 of a two-row batch (its length cut by the other row's acceptance) still
    follows the full model; same tolerances as the single-row test, 2000 draws."""
    prompt, other, length, draws = [2, 1, 3], [0, 3], 3, 2000
    exact = exact_joint(four_token_generator, prompt, length)
    config = GenerationConfig(
        max_steps=length,
        sample=True,
        temperature=1.0,
        top_p=1.0,
        generation_strategy="self_speculative",
        exit_layer=1,
        num_speculations=2,
    )
    rng = torch.Generator().manual_seed(1)
    counts = torch.zeros_like(exact)
    for _ in range(draws):
        first_row = four_token_generator.generate_batch([prompt, other], config, generator=rng)[0]
        counts[tuple(first_row.token_ids)] += 1
    empirical = counts / draws
    assert total_variation(empirical, exact) < 0.1
    for axis in range(length):
        others = tuple(a for a in range(length) if a != axis)
        assert total_variation(empirical.sum(others), exact.sum(others)) < 0.045, axis
