"""Mutation-testing survivors of ``bookkeeping``: slots past a step's count."""

from __future__ import annotations

import torch
from test_equivalence import generator_for, greedy, speculative

from self_speculation.bookkeeping import kept_counts
from self_speculation.streaming import Streamer


def test_a_stop_token_past_the_count_of_a_step_is_not_a_stop() -> None:
    """Slots past a row's count hold rejected drafts (and 0 where no draft was made): a stop
    token there was never generated, so the row keeps its count and runs on."""
    new_tokens = torch.tensor([[3, 7, 9], [3, 0, 0]])
    kept, reason = kept_counts(
        new_tokens,
        torch.tensor([1, 1]),
        None,
        torch.tensor([9, 0]),
        limit=torch.tensor([10, 10]),
        generated=torch.tensor([2, 2]),
        reason=torch.tensor([0, 0]),
    )
    assert kept.tolist() == [1, 1]
    assert reason.tolist() == [0, 0]


class _Steps(Streamer):
    def __init__(self) -> None:
        self.steps: list[tuple[list[int], list[int], int]] = []

    def on_step(self, new_tokens: list[int], draft_tokens: list[int], accepted: int) -> None:
        self.steps.append((new_tokens, draft_tokens, accepted))


def test_a_rejected_draft_that_is_a_stop_token_stops_nothing() -> None:
    generator = generator_for("llama_mha_untied")
    reference = generator.generate([5, 60, 7], greedy(30)).token_ids
    steps = _Steps()
    generator.generate([5, 60, 7], speculative(1, 4, max_steps=30), streamer=steps)
    # A draft after a rejected one (still in the step's new tokens, past its count) that
    # the text never holds.
    stop = next(
        token
        for _, drafts, accepted in steps.steps
        for token in drafts[accepted + 1 :]
        if token not in reference
    )
    result = generator.generate([5, 60, 7], speculative(1, 4, max_steps=30, stop_token_ids=[stop]))
    assert result.token_ids == reference
    assert result.stop_reason == "max_steps"
