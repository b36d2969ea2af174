"""kept_counts at a row's token limit: an end-of-sequence token that is the last token the
limit allows stops the row as "eos", not "max_steps"; a row already stopped keeps its
reason in later steps, even at its limit (mutations of both checks went untested)."""

from __future__ import annotations

import torch

from self_speculation.bookkeeping import EOS, LIMIT, kept_counts

STOP_IDS = torch.tensor([9, -1])


def test_a_stop_token_at_the_limit_is_an_end_of_sequence() -> None:
    kept, reason = kept_counts(
        torch.tensor([[5, 9, 4], [5, 6, 4]]),  # new tokens [batch, n]
        torch.tensor([3, 3]),  # counts
        None,
        STOP_IDS,
        torch.tensor([2, 2]),  # limit
        torch.tensor([0, 0]),  # generated
        torch.tensor([0, 0]),  # running
    )
    assert kept.tolist() == [2, 2]
    assert reason.tolist() == [EOS, LIMIT]


def test_a_stopped_row_keeps_its_reason_at_its_limit() -> None:
    kept, reason = kept_counts(
        torch.tensor([[5, 6]]),
        torch.tensor([2]),
        None,
        STOP_IDS,
        torch.tensor([4]),
        torch.tensor([4]),  # its eos was the last token its limit allowed
        torch.tensor([EOS]),
    )
    assert kept.tolist() == [0]
    assert reason.tolist() == [EOS]
