"""A step's books, kept on the device: how many of its new tokens each row keeps, why rows
stop, and each prompt's statistics.

The same functions close a step in the generator's loop and inside a compiled step
(``ForwardPasses.decode_step`` and ``counted_greedy_step``), where the bookkeeping is part of the
step's one compiled call. They return new tensors and mutate none: a compiled step then
writes no tensor but the cache's buffers (a CUDA graph may only mutate inputs at static
addresses), and the host reads one small tensor per step (``summary``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Why a row stopped, as the codes kept on the device (0: running).
EOS, LIMIT, STOP_WORD, NON_FINITE = 1, 2, 3, 4
REASONS = {EOS: "eos", STOP_WORD: "stop_word", NON_FINITE: "non_finite_logits"}


def appended(
    tokens: torch.Tensor, lengths: torch.Tensor, new_tokens: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` [batch, capacity] with the first ``counts[b]`` of ``new_tokens[b]``
    [batch, n] written from column ``lengths[b]`` on, and the new lengths (new tensors:
    compiled steps mutate no input but the cache)."""
    positions = torch.arange(new_tokens.shape[1], device=counts.device)
    columns = (lengths[:, None] + positions).clamp_max(tokens.shape[1] - 1)
    # Slots past a row's count are written with what is already there.
    current = tokens.gather(1, columns)
    kept = torch.where(positions < counts[:, None], new_tokens, current)
    return tokens.scatter(1, columns, kept), lengths + counts


def kept_counts(
    new_tokens: torch.Tensor,
    new_counts: torch.Tensor,
    non_finite: torch.Tensor | None,
    stop_ids: torch.Tensor,
    limit: torch.Tensor,
    generated: torch.Tensor,
    reason: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of a step each row keeps, [batch], and why rows stop after it, [batch].

    A running row keeps its ``new_counts`` first ``new_tokens`` [batch, n] up to and
    including the first of ``stop_ids``, and no more than ``limit - generated`` allows;
    where one of those was chosen from logits that were not finite (``non_finite``,
    [batch, n] bool, ``sampling.non_finite``), only the tokens before it, and it stops there.
    """
    running = reason == 0
    index = torch.arange(new_tokens.shape[1], device=new_counts.device)
    is_stop = torch.isin(new_tokens, stop_ids) & (index < new_counts[:, None])  # [batch, n]
    has_stop = is_stop.any(dim=1)
    through_stop = torch.where(has_stop, is_stop.long().argmax(dim=1) + 1, new_counts)
    room = limit - generated
    kept = torch.minimum(through_stop, room) * running  # [batch]
    broken = torch.zeros_like(running)
    if non_finite is not None:
        bad = non_finite & (index < kept[:, None])  # [batch, n]: among the kept
        broken = bad.any(dim=1)
        kept = torch.where(broken, bad.long().argmax(dim=1), kept)
    healthy = running & ~broken
    stops = healthy & has_stop & (through_stop <= room)
    full = healthy & ~stops & (generated + kept >= limit)
    reason = reason.masked_fill(stops, EOS).masked_fill(full, LIMIT).masked_fill(broken, NON_FINITE)
    return kept, reason


def settle(
    new_tokens: torch.Tensor,
    new_counts: torch.Tensor,
    non_finite: torch.Tensor | None,
    accepted_counts: torch.Tensor,
    made: torch.Tensor | int | None,
    stop_ids: torch.Tensor,
    limit: torch.Tensor,
    generated: torch.Tensor,
    reason: torch.Tensor,
    statistics: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Close a step: ``kept_counts``, the rows' new totals, and the step counted for the
    rows that ran it (``made``: drafts made, an int or a [1] tensor; None: not a counted
    step, the prompt's first token).

    Returns:
        kept [batch], generated [batch], reason [batch], statistics [batch, 3] (steps,
        drafts, accepted drafts) and the step's summary for the host: kept, reason and the
        new tokens, flattened into one [batch * (2 + n)] tensor.
    """
    active = reason == 0
    kept, reason = kept_counts(
        new_tokens, new_counts, non_finite, stop_ids, limit, generated, reason
    )
    if made is not None:
        statistics = statistics + torch.stack(
            [active.long(), made * active, accepted_counts * active], 1
        )
    return kept, generated + kept, reason, statistics, summary(kept, reason, new_tokens)


def summary(kept: torch.Tensor, reason: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """What the host reads of a step, in one tensor: kept counts [batch], stop codes
    [batch], then the new tokens [batch, n] row by row."""
    return torch.cat([kept, reason, new_tokens.flatten()])


@dataclass
class RowBooks:
    """Per-row counters on the device, in the batch's current row order (finished rows
    leave it). Steps replace the tensors (``settle``); the generator's stop-word cut writes
    into the current ones. Every tensor a step reads has the batch's rows as its first
    dimension, but the stop ids (at least two: a dynamic size, compiled once).

    Attributes:
        limit: tokens each row may generate, [rows].
        generated: tokens each row has kept so far, [rows].
        reason: why each row stopped (0: running; EOS, LIMIT, ...), [rows].
        statistics: steps, drafts and accepted drafts of each row, [rows, 3].
        stop_ids: the token ids that end a row (-1: none, filling), [ids].
        prompt: the prompt each row decodes, [rows].
        done: statistics of the rows that left the batch, per prompt, [prompts, 3].
    """

    limit: torch.Tensor
    generated: torch.Tensor
    reason: torch.Tensor
    statistics: torch.Tensor
    stop_ids: torch.Tensor
    prompt: torch.Tensor
    done: torch.Tensor

    @classmethod
    def start(cls, limits: list[int], stop_ids: list[int], device: torch.device) -> RowBooks:
        limit = torch.tensor(limits, device=device)
        stop_ids = list(stop_ids) + [-1] * (2 - len(stop_ids))
        return cls(
            limit,
            torch.zeros_like(limit),
            torch.zeros_like(limit),
            torch.zeros(len(limits), 3, dtype=torch.long, device=device),
            torch.tensor(stop_ids, dtype=torch.long, device=device),
            torch.arange(len(limits), device=device),
            torch.zeros(len(limits), 3, dtype=torch.long, device=device),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What ``settle`` reads after the step's own outputs: stop ids, limit, generated,
        reason, statistics."""
        return self.stop_ids, self.limit, self.generated, self.reason, self.statistics

    def update(
        self, generated: torch.Tensor, reason: torch.Tensor, statistics: torch.Tensor
    ) -> None:
        self.generated, self.reason, self.statistics = generated, reason, statistics

    def select(self, index: torch.Tensor) -> RowBooks:
        """The rows at ``index`` (in that order); the others' statistics go to ``done``."""
        done = self.done.index_add(0, self.prompt, self.statistics)
        return RowBooks(
            self.limit[index],
            self.generated[index],
            self.reason[index],
            torch.zeros_like(self.statistics[index]),
            self.stop_ids,
            self.prompt[index],
            done,
        )

    def totals(self) -> list[list[int]]:
        """Steps, drafts and accepted drafts, each a list over prompts."""
        return self.done.index_add(0, self.prompt, self.statistics).T.tolist()
