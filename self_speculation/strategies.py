"""Decoding strategies behind one interface, and the registry the scripts use.

A strategy advances a ``DecodingState`` by one step and returns the tokens it produced.
The generator owns the loop, stopping, streaming and timing.

Cache invariant (every strategy): after each step, every layer that has run holds exactly
``len(state.tokens) - 1`` positions; the last token (the *pending* token) is not yet in any
cache. Early-exit-only decoding never runs layers [E, L), whose caches stay empty.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import Cache

from self_speculation.config import GenerationConfig, GenerationStrategyName
from self_speculation.model_surgery import LayerwiseModel, truncate_cache
from self_speculation.sampling import TokenSelector, greedy_accept, speculative_accept


@dataclass
class DecodingState:
    """One sequence being decoded.

    Attributes:
        tokens: prompt + generated token ids so far, [seq] (last one pending).
        cache: the shared KV cache of all layers.
    """

    tokens: torch.Tensor
    cache: Cache

    @property
    def pending_position(self) -> int:
        return self.tokens.shape[0] - 1


@dataclass
class StepResult:
    """What one decoding step produced.

    Attributes:
        new_tokens: tokens appended to the sequence (accepted drafts + correction/bonus).
        draft_tokens: tokens the early exit proposed (empty for autoregressive).
        accepted_count: how many of ``draft_tokens`` the full model accepted.
    """

    new_tokens: list[int]
    draft_tokens: list[int] = field(default_factory=list)
    accepted_count: int = 0


def _positions(start: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device).unsqueeze(0)  # [1, count]


class GenerationStrategy(abc.ABC):
    """A decoding strategy for one sequence (batch size 1).

    Args:
        model: the layer-wise view of the model.
        config: resolved generation settings (exit_layer / num_speculations filled in).
        selector: turns logits into tokens.
        stop_token_ids: end-of-sequence ids; drafting stops after drafting one of them.
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
        self.stop_token_ids = stop_token_ids

    @property
    @abc.abstractmethod
    def prefill_layers(self) -> int:
        """How many layers the prompt runs through."""

    def prefill(self, prompt: torch.Tensor) -> tuple[DecodingState, int]:
        """Run the prompt [seq] and choose the first generated token."""
        cache = self.model.new_cache()
        hidden = self.model.embed(prompt.unsqueeze(0))  # [1, seq, hidden]
        positions = _positions(0, prompt.shape[0], prompt.device)
        hidden = self.model.run_layers(hidden, 0, self.prefill_layers, cache, positions)
        logits = self.model.unembed(hidden[:, -1:])[0]  # [1, vocab]
        token, _ = self.selector.choose(prompt, logits)
        return DecodingState(tokens=prompt, cache=cache), token

    @abc.abstractmethod
    def step(self, state: DecodingState, budget: int) -> StepResult:
        """Advance ``state`` (whose last token is pending) by at most ``budget`` tokens."""


class AutoRegressiveGenerationStrategy(GenerationStrategy):
    """One token per step from layers [0, E); E == L is ordinary decoding."""

    name = GenerationStrategyName.AUTOREGRESSIVE

    @property
    def prefill_layers(self) -> int:
        return self.config.exit_layer

    def step(self, state: DecodingState, budget: int) -> StepResult:
        pending = state.tokens[-1:].unsqueeze(0)  # [1, 1]
        positions = _positions(state.pending_position, 1, pending.device)
        hidden = self.model.run_layers(
            self.model.embed(pending), 0, self.config.exit_layer, state.cache, positions
        )
        logits = self.model.unembed(hidden)[0]  # [1, vocab]
        token, _ = self.selector.choose(state.tokens, logits)
        return StepResult(new_tokens=[token])


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

    def _early(self, token: int, position: int, cache: Cache) -> torch.Tensor:
        """Exit-layer hidden state [1, 1, hidden] of ``token`` at ``position``."""
        ids = torch.tensor([[token]], device=self.model.device)  # [1, 1]
        hidden = self.model.embed(ids)
        positions = _positions(position, 1, ids.device)
        return self.model.run_layers(hidden, 0, self.config.exit_layer, cache, positions)

    def step(self, state: DecodingState, budget: int) -> StepResult:
        exit_layer, cache = self.config.exit_layer, state.cache
        start = state.pending_position
        # Never draft more than can be kept: k drafts yield up to k + 1 tokens.
        num_drafts = min(self.config.num_speculations, budget - 1)
        context = state.tokens
        exit_states = []  # exit-layer states of the pending token and each draft
        draft_tokens: list[int] = []
        draft_probs = []
        token = int(state.tokens[-1])
        for i in range(num_drafts):
            exit_states.append(self._early(token, start + i, cache))
            logits = self.model.unembed(exit_states[-1])[0]  # [1, vocab]
            token, probs = self.selector.choose(context, logits)
            draft_tokens.append(token)
            draft_probs.append(probs)
            context = torch.cat([context, context.new_tensor([token])])
            if token in self.stop_token_ids:
                break  # nothing after an end-of-sequence token is ever kept
        exit_states.append(self._early(token, start + len(draft_tokens), cache))

        # Verification: one pass through [E, L) over the pending token and every draft.
        verify_hidden = torch.cat(exit_states, dim=1)  # [1, k + 1, hidden]
        positions = _positions(start, verify_hidden.shape[1], verify_hidden.device)
        verify_hidden = self.model.run_layers(
            verify_hidden, exit_layer, self.model.num_layers, cache, positions
        )
        target_logits = self.model.unembed(verify_hidden)[0]  # [k + 1, vocab]

        drafts = torch.tensor(draft_tokens, device=target_logits.device, dtype=torch.long)  # [k]
        if self.selector.sample:
            target_probs = self.selector.probabilities(context, target_logits)  # [k + 1, vocab]
            stacked_draft_probs = (
                torch.stack(draft_probs) if draft_probs else target_probs[:0]
            )  # [k, vocab]
            accepted_count, next_token = speculative_accept(
                drafts, stacked_draft_probs, target_probs, self.selector.generator
            )
        else:
            target_tokens = self.selector.greedy_tokens(context, target_logits)  # [k + 1]
            accepted_count, next_token = greedy_accept(drafts, target_tokens)

        # Positions start .. start + accepted_count hold the pending token and the
        # accepted drafts: keep them, drop the rest.
        truncate_cache(cache, start + accepted_count + 1)
        return StepResult(
            new_tokens=draft_tokens[:accepted_count] + [next_token],
            draft_tokens=draft_tokens,
            accepted_count=accepted_count,
        )


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
