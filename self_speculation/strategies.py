"""Decoding strategies behind one interface, and the registry the scripts use.

A strategy advances a ``DecodingState`` (a batch of left-padded sequences) by one step and
returns the tokens it produced; the generator owns the loop, stopping, streaming and timing.
Every row of a batch gains the same number of tokens per step, so the batch stays
rectangular: in a self-speculative step the batch keeps the smallest accepted count among
its unfinished rows (for a row that accepted more, the token after that count is one of its
own accepted drafts, so every row's output is still exactly its own).

Cache invariant (every strategy): after each step, every layer that has run holds exactly
``columns - 1`` positions; the last column (the *pending* tokens) is in no cache yet.
Early-exit-only decoding never runs layers [E, L), whose caches stay empty.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import Cache

from self_speculation.config import GenerationConfig, GenerationStrategyName
from self_speculation.errors import UnsupportedModelError
from self_speculation.model_surgery import LayerwiseModel, truncate_cache
from self_speculation.sampling import TokenSelector, greedy_accept, speculative_accept


@dataclass
class DecodingState:
    """A batch of sequences being decoded.

    Attributes:
        tokens: left-padded prompts + generated tokens, [batch, columns]; the last column
            holds the pending tokens.
        cache: the shared KV cache of all layers.
        pad_counts: left padding of each row, [batch].
        padding_mask: 1 for real tokens, 0 for padding, [batch, columns]; None when no
            row is padded (then no mask is needed at all).
    """

    tokens: torch.Tensor
    cache: Cache
    pad_counts: torch.Tensor
    padding_mask: torch.Tensor | None

    @property
    def pending_column(self) -> int:
        return self.tokens.shape[1] - 1

    def positions(self, first_column: int, count: int) -> torch.Tensor:
        """Positions of columns [first_column, first_column + count), [batch, count]."""
        columns = torch.arange(first_column, first_column + count, device=self.tokens.device)
        return columns.unsqueeze(0) - self.pad_counts.unsqueeze(1)

    def mask_through(self, columns: int) -> torch.Tensor | None:
        """The padding mask extended with real tokens up to ``columns`` columns."""
        if self.padding_mask is None:
            return None
        extra = columns - self.padding_mask.shape[1]
        return torch.cat(
            [self.padding_mask, self.padding_mask.new_ones(len(self.tokens), extra)], 1
        )

    def append(self, new_tokens: torch.Tensor) -> None:
        """Add ``new_tokens`` [batch, n] as the newest columns."""
        self.tokens = torch.cat([self.tokens, new_tokens], dim=1)
        self.padding_mask = self.mask_through(self.tokens.shape[1])


@dataclass
class StepResult:
    """What one decoding step produced, for every row.

    Attributes:
        new_tokens: tokens appended to each row (accepted drafts + correction/bonus),
            [batch, accepted_count + 1].
        draft_tokens: tokens the early exit proposed, [batch, drafts] (no columns for
            autoregressive decoding).
        accepted_count: how many drafts every row kept.
    """

    new_tokens: torch.Tensor
    draft_tokens: torch.Tensor
    accepted_count: int = 0


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device):
    """Prompts -> (tokens [batch, columns], pad_counts [batch], padding mask or None)."""
    width = max(len(prompt) for prompt in prompts)
    pad_counts = torch.tensor([width - len(prompt) for prompt in prompts], device=device)
    tokens = torch.tensor(
        [[pad_token_id] * (width - len(prompt)) + list(prompt) for prompt in prompts],
        dtype=torch.long,
        device=device,
    )  # [batch, columns]
    if not bool(pad_counts.any()):
        return tokens, pad_counts, None
    columns = torch.arange(width, device=device).unsqueeze(0)
    return tokens, pad_counts, (columns >= pad_counts.unsqueeze(1)).long()


class GenerationStrategy(abc.ABC):
    """A decoding strategy.

    Args:
        model: the layer-wise view of the model.
        config: resolved generation settings (exit_layer / num_speculations filled in).
        selector: turns logits into tokens.
        stop_token_ids: end-of-sequence ids; drafting stops once every unfinished row
            has drafted one.
    """

    name: ClassVar[GenerationStrategyName]

    def __init__(
        self,
        model: LayerwiseModel,
        config: GenerationConfig,
        selector: TokenSelector,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        self.config = config
        self.selector = selector
        self.stop_token_ids = torch.tensor(sorted(stop_token_ids), device=model.device)

    @property
    @abc.abstractmethod
    def prefill_layers(self) -> int:
        """How many layers the prompt runs through."""

    def forward(
        self, state: DecodingState, hidden: torch.Tensor, start: int, end: int, first_column: int
    ) -> torch.Tensor:
        """Layers [start, end) over the columns from ``first_column`` of ``hidden``."""
        count = hidden.shape[1]
        return self.model.run_layers(
            hidden,
            start,
            end,
            state.cache,
            state.positions(first_column, count),
            state.mask_through(first_column + count),
        )

    def prefill(
        self, prompts: Sequence[Sequence[int]], pad_token_id: int
    ) -> tuple[DecodingState, torch.Tensor]:
        """Run the prompts and choose each row's first generated token, [batch]."""
        tokens, pad_counts, padding_mask = left_pad(prompts, pad_token_id, self.model.device)
        state = DecodingState(tokens, self.model.new_cache(), pad_counts, padding_mask)
        hidden = self.forward(state, self.model.embed(tokens), 0, self.prefill_layers, 0)
        logits = self.model.unembed(hidden[:, -1:])  # [batch, 1, vocab]
        if bool(torch.isnan(logits).any()):
            raise UnsupportedModelError(
                "the model produced NaN logits for the prompt"
                + (
                    " (left padding in a batch: try one prompt at a time)"
                    if len(prompts) > 1
                    else ""
                )
            )
        first_tokens, _ = self.selector.choose(tokens, pad_counts, logits[:, 0])
        return state, first_tokens

    @abc.abstractmethod
    def step(self, state: DecodingState, budget: int, active: torch.Tensor) -> StepResult:
        """Advance ``state`` by at most ``budget`` tokens per row.

        Args:
            state: the batch; its last column is pending.
            budget: the most tokens any unfinished row may still take.
            active: which rows are unfinished, [batch] bool.
        """


class AutoRegressiveGenerationStrategy(GenerationStrategy):
    """One token per step from layers [0, E); E == L is ordinary decoding."""

    name = GenerationStrategyName.AUTOREGRESSIVE

    @property
    def prefill_layers(self) -> int:
        return self.config.exit_layer

    def step(self, state: DecodingState, budget: int, active: torch.Tensor) -> StepResult:
        pending = self.model.embed(state.tokens[:, -1:])  # [batch, 1, hidden]
        hidden = self.forward(state, pending, 0, self.config.exit_layer, state.pending_column)
        logits = self.model.unembed(hidden)[:, 0]  # [batch, vocab]
        tokens, _ = self.selector.choose(state.tokens, state.pad_counts, logits)
        return StepResult(new_tokens=tokens.unsqueeze(1), draft_tokens=tokens.unsqueeze(1)[:, :0])


class SelfSpeculativeGenerationStrategy(GenerationStrategy):
    """Draft with layers [0, E), verify with layers [E, L) reusing the drafts' work.

    One step (LayerSkip §5): draft k tokens autoregressively with the early exit, keeping
    the exit-layer hidden states (the exit query cache); run the last draft through
    layers [0, E); verify all k + 1 positions in one pass through layers [E, L) starting
    from the kept states; accept; roll every cache back to the accepted length.
    """

    name = GenerationStrategyName.SELF_SPECULATIVE

    @property
    def prefill_layers(self) -> int:
        return self.model.num_layers

    def _early(self, state: DecodingState, tokens: torch.Tensor, column: int) -> torch.Tensor:
        """Exit-layer hidden states [batch, 1, hidden] of ``tokens`` [batch] at ``column``."""
        hidden = self.model.embed(tokens.unsqueeze(1))  # [batch, 1, hidden]
        return self.forward(state, hidden, 0, self.config.exit_layer, column)

    def step(self, state: DecodingState, budget: int, active: torch.Tensor) -> StepResult:
        exit_layer, first_column = self.config.exit_layer, state.pending_column
        # Never draft more than can be kept: k drafts yield up to k + 1 tokens.
        num_drafts = min(self.config.num_speculations, budget - 1)
        context = state.tokens  # [batch, columns + drafts so far]
        exit_states = []  # exit-layer states of the pending tokens and each draft
        draft_probs = []  # [batch, vocab] per draft, when sampling
        tokens = state.tokens[:, -1]  # [batch]
        drafted_stop = torch.zeros_like(active)
        for i in range(num_drafts):
            exit_states.append(self._early(state, tokens, first_column + i))
            logits = self.model.unembed(exit_states[-1])[:, 0]  # [batch, vocab]
            tokens, probs = self.selector.choose(context, state.pad_counts, logits)
            draft_probs.append(probs)
            context = torch.cat([context, tokens.unsqueeze(1)], dim=1)
            if len(self.stop_token_ids):
                drafted_stop |= torch.isin(tokens, self.stop_token_ids)
                if bool(drafted_stop[active].all()):
                    break  # nothing after an end-of-sequence token is ever kept
            if self.config.draft_confidence_threshold > 0:
                confidence = (
                    probs if probs is not None else torch.softmax(logits.float(), dim=-1)
                ).amax(dim=-1)  # [batch]
                if bool((confidence[active] < self.config.draft_confidence_threshold).any()):
                    break  # an unsure draft is likely rejected: verify what we have
        draft_tokens = context[:, state.tokens.shape[1] :]  # [batch, k]
        k = draft_tokens.shape[1]
        exit_states.append(self._early(state, tokens, first_column + k))

        # Verification: one pass through [E, L) over the pending tokens and every draft.
        verify_hidden = torch.cat(exit_states, dim=1)  # [batch, k + 1, hidden]
        verify_hidden = self.forward(
            state, verify_hidden, exit_layer, self.model.num_layers, first_column
        )
        target_logits = self.model.unembed(verify_hidden)  # [batch, k + 1, vocab]

        if self.selector.sample:
            target_probs = self.selector.probabilities(context, state.pad_counts, target_logits)
            stacked_draft_probs = (
                torch.stack(draft_probs, dim=1) if draft_probs else target_probs[:, :0]
            )  # [batch, k, vocab]
            decisions = [
                speculative_accept(
                    draft_tokens[row],
                    stacked_draft_probs[row],
                    target_probs[row],
                    self.selector.generator,
                )
                for row in range(len(draft_tokens))
            ]
        else:
            target_tokens = self.selector.greedy_tokens(
                context, state.pad_counts, target_logits
            )  # [batch, k + 1]
            decisions = [
                greedy_accept(draft_tokens[row], target_tokens[row])
                for row in range(len(draft_tokens))
            ]
        accepted_count = min(
            count for (count, _), is_active in zip(decisions, active.tolist()) if is_active
        )
        # A row that accepted more than the batch keeps its own accepted draft next.
        # (Finished rows may have accepted fewer; their tokens are never read.)
        next_tokens = torch.tensor(
            [
                next_token if count <= accepted_count else int(draft_tokens[row, accepted_count])
                for row, (count, next_token) in enumerate(decisions)
            ],
            device=draft_tokens.device,
        )  # [batch]

        # Columns first_column .. first_column + accepted_count hold the pending tokens and
        # the accepted drafts: keep them, drop the rest.
        truncate_cache(state.cache, first_column + accepted_count + 1)
        new_tokens = torch.cat(
            [draft_tokens[:, :accepted_count], next_tokens.unsqueeze(1)], dim=1
        )  # [batch, accepted_count + 1]
        return StepResult(new_tokens, draft_tokens, accepted_count)


STRATEGIES: dict[GenerationStrategyName, type[GenerationStrategy]] = {
    strategy.name: strategy
    for strategy in (AutoRegressiveGenerationStrategy, SelfSpeculativeGenerationStrategy)
}


def build_strategy(
    model: LayerwiseModel,
    config: GenerationConfig,
    selector: TokenSelector,
    stop_token_ids: frozenset[int] = frozenset(),
) -> GenerationStrategy:
    """The registered strategy for ``config.generation_strategy``."""
    strategy_class = STRATEGIES[GenerationStrategyName(config.generation_strategy)]
    return strategy_class(model, config, selector, stop_token_ids)
