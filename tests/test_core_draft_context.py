"""Mutation-testing survivors of the draft loop: what a draft's processors see."""

from __future__ import annotations

from test_equivalence import NUM_LAYERS, generator_for, speculative


def test_full_model_drafts_under_no_repeat_ngram_are_all_accepted() -> None:
    """Drafting with every layer, no_repeat_ngram_size=2: each draft's processors see the
    drafts before it (as verification does), so no draft repeats a bigram that
    verification bans, and every draft is accepted."""
    generator = generator_for("mistral")  # its greedy output loops
    result = generator.generate(
        [5, 6, 7], speculative(NUM_LAYERS, 4, max_steps=30, no_repeat_ngram_size=2)
    )
    bigrams = list(zip(result.token_ids, result.token_ids[1:]))
    assert len(bigrams) == len(set(bigrams))
    assert result.num_drafted > 0 and result.num_accepted == result.num_drafted
