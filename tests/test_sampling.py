"""Acceptance rules and sampling reproduce the target distribution."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.sampling import TokenSelector, greedy_accept, speculative_accept


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def test_greedy_accept_takes_the_longest_agreeing_prefix_then_the_target_token() -> None:
    drafts = torch.tensor([[4, 5, 6], [4, 5, 6], [4, 5, 6], [4, 5, -1]])  # -1: no draft
    targets = torch.tensor([[4, 5, 6, 9], [4, 7, 6, 9], [1, 5, 6, 9], [4, 5, 8, 9]])
    accepted, next_tokens = greedy_accept(drafts, targets)
    # bonus token; correction; first draft wrong; two drafts made, both kept: token 8 is
    # the bonus of the real drafts, whatever the target said past them.
    assert accepted.tolist() == [3, 1, 0, 2]
    assert next_tokens.tolist() == [9, 7, 1, 8]
    accepted, next_tokens = greedy_accept(drafts[:, :0], targets[:, :1])  # no drafts
    assert accepted.tolist() == [0] * 4 and next_tokens.tolist() == [4, 4, 1, 4]


@pytest.mark.parametrize("num_drafts", [1, 3])
def test_speculative_accept_outputs_follow_the_target_distribution(num_drafts: int) -> None:
    """Every kept position i is distributed as p_i given the kept prefix: the first kept
    token ~ p_0, and the token after an accepted first draft ~ p_1 (rows drawn at once)."""
    vocab, draws = 5, 40_000
    source = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(num_drafts + 1, vocab, generator=source) * 2, -1)
    draft = torch.softmax(torch.randn(num_drafts, vocab, generator=source) * 2, -1)
    rng = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(draft.repeat(draws, 1), 1, True, generator=rng)
    drafts = drafts.view(draws, num_drafts)  # [draws, k]
    accepted, next_tokens = speculative_accept(
        drafts, draft.expand(draws, -1, -1), target.expand(draws, -1, -1), rng
    )
    kept = torch.cat([drafts, next_tokens[:, None]], 1).scatter(
        1, accepted[:, None], next_tokens[:, None]
    )
    first = torch.bincount(kept[:, 0], minlength=vocab) / draws
    # The expected acceptance of the first draft is sum_x min(p, q).
    expected_first_acceptance = float(torch.minimum(target[0], draft[0]).sum())
    assert total_variation(first, target[0]) < 0.015  # sampling noise ~0.005
    assert abs(float((accepted >= 1).float().mean()) - expected_first_acceptance) < 0.015
    if num_drafts > 1:
        second = kept[accepted >= 1, 1]
        assert (
            total_variation(torch.bincount(second, minlength=vocab) / len(second), target[1]) < 0.02
        )


def test_speculative_accept_with_fewer_drafts_than_slots_draws_the_bonus_from_p() -> None:
    """A row that drafted 1 of 3 slots and kept it draws its next token from p_1, never
    from a residual against the empty slots' q."""
    vocab, draws = 4, 20_000
    target = torch.tensor(
        [[0.0, 1.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 0, 0, 0], [1.0, 0, 0, 0]]
    )
    draft = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0, 0, 0]])
    drafts = torch.tensor([[1, -1, -1]]).expand(draws, -1)
    accepted, next_tokens = speculative_accept(
        drafts,
        draft.expand(draws, -1, -1),
        target.expand(draws, -1, -1),
        torch.Generator().manual_seed(0),
    )
    assert accepted.eq(1).all()
    assert total_variation(torch.bincount(next_tokens, minlength=vocab) / draws, target[1]) < 0.02


def test_speculative_accept_with_identical_distributions_accepts_everything() -> None:
    probs = torch.softmax(torch.randn(4, 7), -1)
    drafts = torch.tensor([[1, 2, 3]])
    accepted, _ = speculative_accept(
        drafts, probs[None, :3], probs[None], torch.Generator().manual_seed(0)
    )
    assert accepted.tolist() == [3]


def test_a_draft_the_target_forbids_is_never_accepted_even_at_a_zero_uniform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.rand can return exactly 0.0: p = 0 must still reject
    (a token top-k, top-p or a ban removed), and p >= q > 0 must still accept."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.zeros(*shape))
    draft = torch.tensor([[[0.5, 0.5, 0.0]], [[0.5, 0.5, 0.0]]])  # [2, 1, 3]
    target = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [0, 1.0, 0]]])
    accepted, next_tokens = speculative_accept(
        torch.tensor([[1], [1]]), draft, target, torch.Generator().manual_seed(0)
    )
    assert accepted.tolist() == [0, 1]
    assert next_tokens[0].item() == 0


def test_sampled_drafts_from_a_reduced_vocabulary_the_processors_ban_entirely() -> None:
    """Every token of the draft vocabulary already in the text and no_repeat_ngram_size=1:
    the draft exit has no allowed token. It proposes uniformly instead of failing, and
    the output still obeys the ban (verification samples the full model)."""
    from self_speculation.draft import DraftExit

    model = make_tiny_model(
        "llama_mha_untied", vocab_size=16, bos_token_id=None, eos_token_id=None, seed=1
    )
    generator = Generator(model, IdTokenizer())
    generator.draft = DraftExit(generator.layerwise, None, torch.tensor([5, 6]))
    prompt = [5, 6, 3]
    config = GenerationConfig(
        generation_strategy="self_speculative", exit_layer=2, num_speculations=2,
        max_steps=6, sample=True, temperature=1.0, top_p=1.0, no_repeat_ngram_size=1,
    )  # fmt: skip
    for seed in range(5):
        result = generator.generate(prompt, config, generator=torch.Generator().manual_seed(seed))
        text = prompt + result.token_ids
        assert len(result.token_ids) == 6
        assert len(set(text)) == len(text), text  # no token repeats


def test_selector_processors_see_the_whole_sequence() -> None:
    config = GenerationConfig(sample=False, no_repeat_ngram_size=2)
    selector = TokenSelector(config)
    logits = torch.zeros(2, 2, 6)
    logits[..., 3] = 5.0  # token 3 is everyone's favourite
    # Row 0 is [3, 1, 2, 3, 1]; row 1 is [5, 2, 5] behind two pads (also id 5). Position i
    # of each row follows its tokens up to column 4 + i.
    tokens = torch.tensor([[3, 1, 2, 3, 1], [5, 5, 5, 2, 5]])
    processed = selector.process(logits, tokens, torch.tensor([0, 2]), torch.tensor([4, 4]))
    # row 0, position 0 follows [3, 1, 2, 3]: "3 1" was seen, 1 is banned
    assert torch.isinf(processed[0, 0]).nonzero().flatten().tolist() == [1]
    # row 0, position 1 follows [3, 1, 2, 3, 1]: "1 2" was seen, 2 is banned
    assert torch.isinf(processed[0, 1]).nonzero().flatten().tolist() == [2]
    # row 1, position 0 follows [5, 2]: nothing to ban
    assert not torch.isinf(processed[1, 0]).any()
    # row 1, position 1 follows [5, 2, 5]: bans 2; "5 5" was padding and bans nothing
    assert torch.isinf(processed[1, 1]).nonzero().flatten().tolist() == [2]


def test_selector_warps_every_row_and_position_like_transformers() -> None:
    """Temperature, top-k and top-p on [batch, positions, vocab] at once equal the
    warpers applied one row at a time."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    config = GenerationConfig(sample=True, temperature=0.7, top_k=5, top_p=0.8)
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0))
    tokens = torch.zeros(3, 8, dtype=torch.long)
    probs, empty = TokenSelector(config).distributions(
        logits, tokens, torch.zeros(3, dtype=torch.long), torch.full((3,), 4)
    )
    assert not empty.any()
    for row in range(3):
        for position in range(4):
            scores = logits[row, position : position + 1]
            for warper in (
                TemperatureLogitsWarper(0.7),
                TopKLogitsWarper(5),
                TopPLogitsWarper(0.8),
            ):
                scores = warper(tokens[:1], scores)
            torch.testing.assert_close(probs[row, position], torch.softmax(scores, -1)[0])
    assert (probs > 0).sum(-1).le(5).all()  # top-k really cut


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


def test_speculative_accept_draws_its_own_numbers_in_float64() -> None:
    """Without given uniforms it draws float64 numbers from the generator, as the engine's
    selector does: the same outcome as those numbers handed in."""
    source = torch.Generator().manual_seed(3)
    target = torch.softmax(torch.randn(64, 4, 9, generator=source) * 3, -1)
    draft = torch.softmax(torch.randn(64, 3, 9, generator=source) * 3, -1)
    drafts = torch.multinomial(draft.reshape(-1, 9), 1, generator=source).view(64, 3)
    drawn = speculative_accept(drafts, draft, target, torch.Generator().manual_seed(5))
    uniforms = torch.rand(64, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    given = speculative_accept(drafts, draft, target, None, uniforms)
    assert all(torch.equal(a, b) for a, b in zip(drawn, given))
