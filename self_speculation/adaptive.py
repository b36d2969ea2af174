"""Adaptive speculation length: each step drafts as many tokens as the recent acceptance
pays for (the ``adaptive`` strategy).

A static k drafts the same number of tokens in a stretch the early exit predicts well
(boilerplate, a repeated name) and in one where it guesses; every rejected draft cost a
pass through layers [0, E) and a verification row. Here each row keeps a running estimate
of its per-draft acceptance probability ``a`` (decayed counts of accepted and rejected
drafts), and each step picks, from a few compiled lengths, the one whose expected tokens
per unit of cost is highest under the LayerSkip cost model (§5; REFERENCE §1):

    expected tokens of m drafts  T(m) = (1 - a^(m + 1)) / (1 - a)     (per row, then summed)
    cost of a step of m drafts   m (E + h) + E + (L - E + h) (1 + r m)  (in one-layer passes)

with h the head's cost in layers and r the extra cost of each verified row (a few-row CPU
product reads each weight once for every row: r ~ 0.1; a GPU: ~0). Greedy acceptance does not
depend on how many drafts were made, so any choice gives autoregressive decoding's tokens;
only the speed changes. The length is one per batch step (the batch shares its passes);
the statistics are per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from self_speculation.errors import ConfigError

# How much one step's observations weigh against the ones before (counts decay by this
# factor per step): about the last seven steps decide. Replayed on the shipped model's
# HumanEval trajectories (benchmarks/drafting_bound.py), 0.85 drafted best of 0.3-0.95.
DECAY = 0.85
# Prior: each row starts with `PRIOR_WEIGHT` pseudo-drafts at acceptance
# `PRIOR_ACCEPTANCE` (decaying like real ones), so that its first steps neither draft the
# most nor the least.
PRIOR_ACCEPTANCE = 0.6
PRIOR_WEIGHT = 2.0


def row_cost(device: torch.device) -> float:
    """Extra cost of each verified row over a one-row pass: a CPU's few-row products read
    each weight once for all rows but do the arithmetic per row (verification of 4-7 rows
    cost 1.15-1.35 one-row passes on a 2-core CPU, benchmarks/overhead.py); a GPU's rows
    are nearly free at these counts."""
    return 0.02 if device.type == "cuda" else 0.1


def default_lengths(num_speculations: int) -> tuple[int, ...]:
    """The draft lengths an adaptive step chooses from, up to k: 1, 2, 4, 8, ... and k
    (each is one compiled shape on the fast path)."""
    lengths = {num_speculations}
    length = 1
    while length < num_speculations:
        lengths.add(length)
        length *= 2
    return tuple(sorted(lengths))


def check_lengths(lengths: Sequence[int]) -> None:
    """Raises ConfigError for lengths an adaptive step cannot use."""
    if not lengths:
        raise ConfigError("adaptive_lengths must name at least one draft length")
    if any(not isinstance(length, int) or length < 1 for length in lengths):
        raise ConfigError(f"adaptive_lengths entries must be ints >= 1, got {list(lengths)}")


def expected_tokens(acceptance: torch.Tensor, length: int) -> torch.Tensor:
    """Expected tokens of a step that drafts ``length`` tokens, per row: the accepted
    drafts plus the correction or bonus token, (1 - a^(m+1)) / (1 - a). [rows] -> [rows]."""
    a = acceptance.clamp(0.0, 1.0 - 1e-6)
    return (1 - a ** (length + 1)) / (1 - a)


def step_cost(length: int, exit_layer: int, num_layers: int, head: float, row_cost: float) -> float:
    """A step's cost in one-layer one-token passes: ``length`` drafts through [0, E) and the
    head, the last draft through [0, E), ``length + 1`` rows through [E, L) and the head."""
    verify = (num_layers - exit_layer + head) * (1 + row_cost * length)
    return length * (exit_layer + head) + exit_layer + verify


class DraftLengthPolicy:
    """Per-row acceptance statistics and the draft length of the next step.

    Args:
        lengths: the lengths to choose from (each a compiled shape on the fast path).
        exit_layer, num_layers: E and L.
        head: the head's cost (final norm + LM head) in one-layer passes.
        row_cost: extra cost of each verified row, relative to a one-row pass.
        batch_size: rows of the batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        exit_layer: int,
        num_layers: int,
        head: float,
        row_cost: float,
        batch_size: int,
    ) -> None:
        check_lengths(lengths)
        self.lengths = tuple(sorted(set(lengths)))
        self.costs = torch.tensor(
            [step_cost(m, exit_layer, num_layers, head, row_cost) for m in self.lengths]
        )  # [lengths]
        # Decayed counts of accepted drafts and of judged drafts, [batch].
        self.accepted = torch.full(
            (batch_size,), PRIOR_ACCEPTANCE * PRIOR_WEIGHT, dtype=torch.float64
        )
        self.trials = torch.full((batch_size,), PRIOR_WEIGHT, dtype=torch.float64)

    def acceptance(self) -> torch.Tensor:
        """Each row's estimated per-draft acceptance probability, [batch]."""
        return self.accepted / self.trials

    def choose(self, active: torch.Tensor | None = None) -> int:
        """The length with the most expected tokens (summed over ``active`` rows, [batch]
        bool; all when None) per unit of step cost."""
        acceptance = self.acceptance()
        if active is not None:
            acceptance = acceptance[active.cpu()]
        rates = (
            torch.stack([expected_tokens(acceptance, m).sum() for m in self.lengths]) / self.costs
        )  # [lengths]
        return self.lengths[int(rates.argmax())]

    def update(self, drafted: int, accepted_counts: torch.Tensor, active: torch.Tensor) -> None:
        """Count a step: ``drafted`` drafts per row, ``accepted_counts`` [batch] kept; a
        row that rejected one saw one failure (the drafts after it were never judged).
        Inactive rows keep their statistics."""
        accepted = accepted_counts.detach().to("cpu", torch.float64)
        keep = active.detach().cpu()
        rejected = (accepted < drafted).to(torch.float64)
        self.accepted = torch.where(keep, DECAY * self.accepted + accepted, self.accepted)
        self.trials = torch.where(keep, DECAY * self.trials + accepted + rejected, self.trials)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the statistics of ``rows`` only (finished rows left the batch)."""
        rows = rows.cpu()
        self.accepted = self.accepted[rows]
        self.trials = self.trials[rows]
