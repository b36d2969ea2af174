"""Adaptive speculation: each step drafts as many tokens (and, given several exits, from
the exit) that the recent acceptance pays for (the ``adaptive`` strategy).

A static k drafts the same number of tokens in a stretch the early exit predicts well
(boilerplate, a repeated name) and in one where it guesses; every rejected draft cost a
pass through layers [0, E) and a verification row. Here each row keeps a running estimate
of its per-draft acceptance probability ``a`` (decayed counts of accepted and rejected
drafts), and each step picks, from a few compiled lengths, the one whose expected tokens
per unit of cost is highest under the LayerSkip cost model (§5; REFERENCE §1):

    expected tokens of m drafts  T(m) = (1 - a^(m + 1)) / (1 - a)     (per row, then summed)
    cost of a step of m drafts   m (E + h) + E + (L - E + h) (1 + r m) + (m + 2) o
                                 (in one-layer passes)

with h the head's cost in layers and r the extra cost of each verified row (a few-row CPU
product reads each weight once for every row: r ~ 0.1; a GPU: ~0) and o the fixed cost of a
pass (m drafts, the last draft, the verification: m + 2 passes), large on a CPU's compiled
path (its kernels are launched one by one). With several exit layers
(``adaptive_exit_layers``), each row keeps one estimate per exit and the step picks the
(exit, length) pair the same way (DEL's idea, COLM 2025, from acceptance statistics).
Greedy acceptance does not depend on how many drafts were made, nor on the exit (every
column's keys and values come out exact either way: drafting fills layers [0, E) of the
columns it writes, verification [E, L) of every column from the pending token on), so any
choice gives autoregressive decoding's tokens; only the speed changes. The choice is one
per batch step (the batch shares its passes); the statistics are per row.
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
        raise ConfigError("an adaptive policy needs at least one draft length")
    if any(not isinstance(length, int) or length < 1 for length in lengths):
        raise ConfigError(f"draft lengths must be ints >= 1, got {list(lengths)}")


def expected_tokens(acceptance: torch.Tensor, length: int) -> torch.Tensor:
    """Expected tokens of a step that drafts ``length`` tokens, per row: the accepted
    drafts plus the correction or bonus token, (1 - a^(m+1)) / (1 - a). [rows] -> [rows]."""
    a = acceptance.clamp(0.0, 1.0 - 1e-6)
    return (1 - a ** (length + 1)) / (1 - a)


def pass_overhead(device: torch.device, compiled: bool) -> float:
    """Fixed cost of one pass, in one-layer passes. Fitted to the shipped model's compiled CPU
    steps (a sweep over E = 6, 7 and k = 2-4 on the fast path: 0.19 ms per layer, 1.07 ms
    per pass, docs/adaptive.md); a GPU step is one CUDA graph (a few microseconds per pass);
    eager passes pay Python per layer, which the layer cost already carries."""
    if compiled and device.type == "cpu":
        return 5.5
    return 0.5


def step_cost(
    length: int,
    exit_layer: int,
    num_layers: int,
    head: float,
    row_cost: float,
    overhead: float = 0.0,
) -> float:
    """A step's cost in one-layer one-token passes: ``length`` drafts through [0, E) and the
    head, the last draft through [0, E), ``length + 1`` rows through [E, L) and the head, and
    ``overhead`` for each of those ``length + 2`` passes."""
    verify = (num_layers - exit_layer + head) * (1 + row_cost * length)
    return length * (exit_layer + head) + exit_layer + verify + (length + 2) * overhead


class DraftPolicy:
    """Per-row acceptance statistics, per exit, and the exit and length of the next step.

    Args:
        exit_layers: the exits to choose from (usually one; each exit x length is one
            compiled shape on the fast path).
        lengths: the draft lengths to choose from.
        num_layers: L.
        head: the head's cost (final norm + LM head) in one-layer passes.
        row_cost: extra cost of each verified row, relative to a one-row pass.
        batch_size: rows of the batch.
        overhead: fixed cost of a pass, in one-layer passes.
    """

    def __init__(
        self,
        exit_layers: Sequence[int],
        lengths: Sequence[int],
        num_layers: int,
        head: float,
        row_cost: float,
        batch_size: int,
        overhead: float = 0.0,
    ) -> None:
        check_lengths(lengths)
        self.exit_layers = tuple(sorted(set(exit_layers)))
        self.lengths = tuple(sorted(set(lengths)))
        self.costs = torch.tensor(
            [
                [
                    step_cost(m, exit_layer, num_layers, head, row_cost, overhead)
                    for m in self.lengths
                ]
                for exit_layer in self.exit_layers
            ],
            dtype=torch.float64,
            device="cpu",  # host statistics, whatever torch.set_default_device says
        )  # [exits, lengths]
        # Decayed counts of accepted drafts and of judged drafts, [batch, exits]; an exit
        # never drafted from keeps the prior (it is tried when the prior makes it worth it).
        shape = (batch_size, len(self.exit_layers))
        host = dict(dtype=torch.float64, device="cpu")
        self.accepted = torch.full(shape, PRIOR_ACCEPTANCE * PRIOR_WEIGHT, **host)
        self.trials = torch.full(shape, PRIOR_WEIGHT, **host)

    def acceptance(self) -> torch.Tensor:
        """Each row's estimated per-draft acceptance probability at each exit,
        [batch, exits]."""
        return self.accepted / self.trials

    def choose(self, active: torch.Tensor | None = None) -> tuple[int, int]:
        """The (exit layer, length) with the most expected tokens (summed over ``active``
        rows, [batch] bool; all when None) per unit of step cost."""
        acceptance = self.acceptance()
        if active is not None:
            acceptance = acceptance[active.cpu()]
        tokens = torch.stack(
            [expected_tokens(acceptance, m).sum(dim=0) for m in self.lengths], dim=1
        )  # [exits, lengths]
        best = int((tokens / self.costs).argmax())
        exit_index, length_index = divmod(best, len(self.lengths))
        return self.exit_layers[exit_index], self.lengths[length_index]

    def update(
        self,
        exit_layer: int,
        drafted: int,
        accepted_counts: torch.Tensor,
        active: torch.Tensor,
    ) -> None:
        """Count a step at ``exit_layer``: ``drafted`` drafts per row, ``accepted_counts``
        [batch] kept; a row that rejected one saw one failure (the drafts after it were
        never judged). Inactive rows keep their statistics."""
        column = self.exit_layers.index(exit_layer)
        accepted = accepted_counts.detach().to("cpu", torch.float64)
        keep = active.detach().cpu()
        rejected = (accepted < drafted).to(torch.float64)
        counts, trials = self.accepted[:, column], self.trials[:, column]
        self.accepted[:, column] = torch.where(keep, DECAY * counts + accepted, counts)
        self.trials[:, column] = torch.where(keep, DECAY * trials + accepted + rejected, trials)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the statistics of ``rows`` only (finished rows left the batch)."""
        rows = rows.cpu()
        self.accepted = self.accepted[rows]
        self.trials = self.trials[rows]
