"""Invariants of the decoding core that hand mutations of it showed no test pinned: the
statistics of rows kept in the batch after they finish, the drafts of a last step, a stop
token exactly at the token limit, and the drafts a rejected tree row reports."""

from __future__ import annotations

import pytest
import torch
from test_equivalence import BATCH_PROMPTS, generator_for, greedy, speculative

from self_speculation.bookkeeping import EOS, LIMIT, kept_counts
from self_speculation.kv_cache import CAPACITY_STEP, BufferPool
from self_speculation.sampling import speculative_accept
from self_speculation.trees import TokenTree, tree_accept


def with_finished_rows_kept(generator, config) -> list:
    """``BATCH_PROMPTS`` as one batch whose finished rows stay in it to the end."""
    generator.shed_finished_rows = False
    try:
        return generator.generate_batch(BATCH_PROMPTS, config)
    finally:
        generator.shed_finished_rows = True


def _statistics(results) -> list[tuple[int, int, int]]:
    return [(r.num_steps, r.num_drafted, r.num_accepted) for r in results]


def test_rows_kept_after_they_finish_count_no_more_drafts_or_acceptances() -> None:
    """A finished row that stays in the batch (shed_finished_rows off, or a compiled batch
    size) runs every later step but must count none of it: its statistics are those of a
    batch it left."""
    generator = generator_for("llama_mha_untied")
    free_runs = [generator.generate(prompt, greedy(30)).token_ids for prompt in BATCH_PROMPTS]
    settings = dict(max_steps=30, stop_token_ids=[free_runs[1][3]])  # row 1 stops early
    config = speculative(4, 3, **settings)  # the full model drafts: every draft accepted
    shed = generator.generate_batch(BATCH_PROMPTS, config)
    kept = with_finished_rows_kept(generator, config)
    assert len({r.num_steps for r in shed}) > 1  # the rows finished apart
    assert [r.token_ids for r in kept] == [r.token_ids for r in shed]
    assert _statistics(kept) == _statistics(shed)
    for result in kept:
        assert result.num_accepted <= result.num_drafted <= 3 * result.num_steps


@pytest.mark.parametrize("max_steps", [2, 3, 5])
def test_a_last_step_drafts_no_more_than_the_limit_leaves_room_for(max_steps: int) -> None:
    """k far above max_steps: the one step drafts max_steps - 1 tokens (with the prompt's
    token, max_steps), not one more that could never be kept."""
    generator = generator_for("llama_mha_untied")
    result = generator.generate([5, 6], speculative(4, 8, max_steps=max_steps))
    assert len(result.token_ids) == max_steps and result.num_steps == 1
    assert result.num_drafted == result.num_accepted == max_steps - 1


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_stop_token_that_is_the_last_allowed_token_stops_with_eos(strategy: str) -> None:
    generator = generator_for("llama_mha_untied")
    reference = generator.generate([5, 6], greedy(12)).token_ids
    # The first token that does not occur before it: the limit falls right after it.
    limit = next(i + 1 for i, token in enumerate(reference) if token not in reference[:i] and i)
    settings = dict(max_steps=limit, stop_token_ids=[reference[limit - 1]])
    config = greedy(**settings) if strategy == "autoregressive" else speculative(2, 3, **settings)
    result = generator.generate([5, 6], config)
    assert result.token_ids == reference[:limit]
    assert result.stop_reason == "eos"


def test_kept_counts_at_the_limit_and_for_finished_rows() -> None:
    """Row 0 ends on a stop token that is its last allowed one: eos, not the limit. Row 1
    stopped before: it keeps nothing, whatever counts it is given."""
    new_tokens = torch.tensor([[3, 7, 9], [3, 7, 9]])
    kept, reason = kept_counts(
        new_tokens,
        torch.tensor([3, 3]),
        None,
        torch.tensor([7, -1]),
        limit=torch.tensor([10, 10]),
        generated=torch.tensor([8, 4]),
        reason=torch.tensor([0, LIMIT]),
    )
    assert kept.tolist() == [2, 0]
    assert reason.tolist() == [EOS, LIMIT]


def test_a_rejected_tree_row_reports_the_most_likely_children_even_where_another_matches() -> None:
    """After a rejection nothing is accepted, whatever the full model says after the
    unaccepted guess: the reported drafts follow rank-0 children (a chain's drafts)."""
    shape = TokenTree((2, 2))  # root 0; depth 1: nodes 1, 2; depth 2: 3, 4 (of 1), 5, 6 (of 2)
    tokens = torch.tensor([[9, 10, 11, 20, 21, 22, 23]])
    targets = torch.tensor([[12, 21, 0, 0, 0, 0, 0]])  # 12 matches no child; 21 is node 4
    accepted, next_tokens, path, drafts = tree_accept(shape, tokens, targets)
    assert accepted.tolist() == [0] and next_tokens.tolist() == [12]
    assert path.tolist() == [[1, 3]] and drafts.tolist() == [[10, 20]]


@pytest.mark.parametrize(
    "settings",
    [
        dict(generation_strategy="autoregressive"),
        dict(generation_strategy="self_speculative", exit_layer=4, num_speculations=3),
        dict(generation_strategy="tree", exit_layer=4, num_speculations=3),
        dict(generation_strategy="adaptive", exit_layer=4, num_speculations=3),
    ],
    ids=lambda settings: settings["generation_strategy"],
)
def test_a_step_does_not_advance_inactive_rows(settings: dict) -> None:
    """``GenerationStrategy.step``: rows marked inactive keep their length and tokens (a
    finished row that stays in the batch must not run on towards the cache's end)."""
    generator = generator_for("llama_mha_untied")
    config = generator.resolve(greedy(8, **settings))
    strategy = generator._strategy(config, None)
    state = strategy.prefill(BATCH_PROMPTS[:2], generator.pad_token_id, 8)
    lengths, tokens = state.lengths.clone(), state.tokens.clone()
    step = strategy.step(state, 3, torch.tensor([True, False]))
    assert step.new_counts.tolist()[1] == 0
    assert state.lengths[1] == lengths[1] and state.lengths[0] > lengths[0]
    assert state.tokens[1, : lengths[1]].equal(tokens[1, : lengths[1]])


def test_an_adaptive_step_cut_short_by_the_limit_counts_only_the_drafts_it_made() -> None:
    """Near a row's limit the generator asks for fewer drafts than the chosen length: all of
    them accepted is no rejection (the statistics must not see a failure)."""
    generator = generator_for("llama_mha_untied")
    config = generator.resolve(
        greedy(8, generation_strategy="adaptive", exit_layer=4, num_speculations=4)
    )
    strategy = generator._strategy(config, None)
    state = strategy.prefill([[5, 6]], generator.pad_token_id, 8)
    policy = state.draft_policy
    policy.accepted = policy.trials * 0.999  # sure drafts: a chain longer than 1 is chosen
    assert policy.choose()[1] > 1
    before = float(policy.acceptance()[0, 0])
    step = strategy.step(state, 1, torch.tensor([True]))  # the full model drafts: accepted
    assert step.accepted_counts.tolist() == [1]
    assert float(policy.acceptance()[0, 0]) > before


def test_pooled_buffers_taken_again_are_zeroed_in_place() -> None:
    """A later generation reuses the pool's buffers: an earlier one's non-finite entries
    (float16 overflowing) must not survive, since attention weighs masked columns by zero
    and 0 x NaN is NaN."""
    pool = BufferPool()
    like = torch.zeros(2, 2, 1, 8)  # [batch, heads, new, head_dim]
    keys, values = pool.take(0, CAPACITY_STEP, 2, like, like)
    keys.fill_(float("nan"))
    values.fill_(float("inf"))
    again_keys, again_values = pool.take(0, CAPACITY_STEP, 2, like, like)
    assert again_keys.data_ptr() == keys.data_ptr()
    assert not again_keys[:2].any() and not again_values[:2].any()


def test_a_tree_path_once_rejected_stays_rejected_deeper_down() -> None:
    """A chain tree (1, 1, 1): the first draft is rejected, so nothing after it is
    accepted, even where the full model agrees with the later drafts given it."""
    shape = TokenTree((1, 1, 1))
    tokens = torch.tensor([[9, 10, 11, 12]])
    targets = torch.tensor([[13, 11, 12, 14]])  # 13 != 10; then 11 and 12 would match
    accepted, next_tokens, path, drafts = tree_accept(shape, tokens, targets)
    assert accepted.tolist() == [0] and next_tokens.tolist() == [13]
    assert path.tolist() == [[1, 2, 3]] and drafts.tolist() == [[10, 11, 12]]


def test_each_draft_is_judged_by_its_own_uniform_draw() -> None:
    """Draft 0 (p/q = 0.5) accepted means a small first uniform; the second draft (p/q = 0.5
    too) must still be accepted half the time, so that the token kept after an accepted
    first draft follows p_1 (one uniform shared by the positions would accept it always)."""
    draws = 20_000
    draft = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # q_0, q_1
    target = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]])  # p_0, p_1, p_2
    drafts = torch.zeros(draws, 2, dtype=torch.long)  # both drafts are token 0
    accepted, next_tokens = speculative_accept(
        drafts, draft.expand(draws, -1, -1), target.expand(draws, -1, -1),
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    first_kept = accepted >= 1
    assert abs(float(first_kept.float().mean()) - 0.5) < 0.02
    second = torch.where(accepted[first_kept] >= 2, 0, next_tokens[first_kept])
    assert abs(float((second == 0).float().mean()) - 0.5) < 0.03


def test_sampled_verification_bans_what_no_repeat_ngram_bans() -> None:
    """Sampling with no_repeat_ngram_size=1: the full model's distributions at every
    verified position see the whole text (the pending token included): no token repeats."""
    from tiny_models import IdTokenizer, make_tiny_model

    from self_speculation import GenerationConfig, Generator

    model = make_tiny_model(
        "llama_mha_untied", vocab_size=24, bos_token_id=None, eos_token_id=None, seed=1
    )
    generator = Generator(model, IdTokenizer())
    config = GenerationConfig(
        generation_strategy="self_speculative", exit_layer=1, num_speculations=3,
        max_steps=12, sample=True, temperature=1.0, top_p=1.0, no_repeat_ngram_size=1,
    )  # fmt: skip
    for seed in range(6):
        result = generator.generate([5, 6], config, generator=torch.Generator().manual_seed(seed))
        text = [5, 6, *result.token_ids]
        assert len(set(text)) == len(text), (seed, text)
