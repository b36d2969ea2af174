"""Decoding strategies behind one interface, and the registry the scripts use.

A strategy advances a ``DecodingState`` (a batch of left-padded sequences in one token
buffer and one ``ColumnKVCache``) by one step and reports, per row, the tokens it
appended; the generator owns the loop, stopping, streaming and timing.

Rows advance independently: each has its own length (columns filled), so in a
self-speculative step every row keeps its own accepted drafts, and a slow row no longer
holds back the others. A step is tensor operations only; the generator reads the per-row
counts once per step (the one host synchronisation).

Column invariant (every strategy): the pending token of row b is at column
``lengths[b] - 1``; every layer that has run holds valid keys/values for the columns
before it. Columns at and after it may hold stale entries from rejected drafts: the next
call writes over them before any query can see them (see ``kv_cache``).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from self_speculation.adaptive import DraftPolicy, default_lengths, pass_overhead, row_cost
from self_speculation.bookkeeping import RowBooks, appended, settle, summary
from self_speculation.config import GenerationConfig, GenerationStrategyName
from self_speculation.errors import ArgumentTypeError, ConfigError, UnsupportedModelError
from self_speculation.kv_cache import ColumnKVCache
from self_speculation.passes import ForwardPasses
from self_speculation.sampling import (
    NoAllowedToken,
    TokenSelector,
    finite_or_uniform,
    greedy_accept,
    kept_tokens,
    non_finite,
    speculative_accept,
)
from self_speculation.trees import TokenTree, default_branching, tree_refusal

logger = logging.getLogger(__name__)


@dataclass
class DecodingState:
    """A batch of sequences being decoded.

    Attributes:
        tokens: left-padded prompts, then generated (and drafted) tokens,
            [batch, capacity].
        lengths: columns filled per row, [batch]; the pending token is at ``lengths - 1``.
        pad_counts: left padding of each row, [batch].
        prompt_width: columns of the padded prompts (generation starts there).
        cache: the shared KV cache of all layers.
        draft_policy: per-row acceptance statistics of the ``adaptive`` strategy.
        rows: which of the generation's rows each row is, [batch], once rows have left
            (``select_rows``); None: all of them, in order.
        num_rows: rows the generation started with (0: ``len(lengths)``).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    pad_counts: torch.Tensor
    prompt_width: int
    cache: ColumnKVCache
    draft_policy: DraftPolicy | None = None
    rows: torch.Tensor | None = None
    num_rows: int = 0

    def __post_init__(self) -> None:
        if not self.num_rows:
            self.num_rows = len(self.lengths)

    def pending_tokens(self) -> torch.Tensor:
        """The newest token of each row, [batch, 1]."""
        return self.tokens.gather(1, self.lengths[:, None] - 1)

    def write(self, new_tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Append the first ``counts[b]`` of ``new_tokens[b]`` [batch, n] to each row."""
        self.tokens, self.lengths = appended(self.tokens, self.lengths, new_tokens, counts)

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order): finished rows leave the batch, so that
        later steps compute nothing for them. Left padding that none of the kept rows
        needs is cut too (their columns all move left by the same amount; positions,
        which count from each row's first real token, do not change)."""
        index = torch.tensor(list(rows), device=self.lengths.device)
        self.rows = index if self.rows is None else self.rows[index]
        pad_counts = self.pad_counts[index]
        first_column = int(pad_counts.min())
        # The buffer keeps its columns (the cache's do too): the last first_column are free.
        self.tokens = torch.nn.functional.pad(self.tokens[index, first_column:], (0, first_column))
        self.lengths = self.lengths[index] - first_column
        self.pad_counts = pad_counts - first_column
        self.prompt_width -= first_column
        self.cache.select_rows(index, first_column)
        if self.draft_policy is not None:
            self.draft_policy.select_rows(index)

    def uniforms(self, selector: TokenSelector, per_row: int) -> torch.Tensor:
        """A sampled step's random numbers, [batch, per_row] (``TokenSelector.uniforms``):
        drawn for every row the generation started with, so that what a row draws does
        not depend on when finished rows left the batch (compiled decoding keeps some
        longer, and a step issued ahead of the host's read runs before they leave)."""
        drawn = selector.uniforms(self.num_rows, per_row, device=self.lengths.device)
        return drawn if self.rows is None else drawn[self.rows]

    def generated(self, row: int, count: int) -> list[int]:
        """The first ``count`` generated tokens of ``row``."""
        return self.tokens[row, self.prompt_width : self.prompt_width + count].tolist()


@dataclass
class StepResult:
    """What one decoding step produced, for every row.

    Attributes:
        new_tokens: tokens appended to each row (accepted drafts, then the correction or
            bonus token), [batch, n]; row b's are the first ``new_counts[b]``.
        new_counts: tokens appended per row, [batch] (0 for rows that were not active).
        draft_tokens: tokens the early exit proposed, [batch, k] (-1 where none; no
            columns for autoregressive decoding).
        accepted_counts: drafts kept per row, [batch].
        non_finite: where the full-model logits that chose ``new_tokens`` were not finite,
            [batch, n] bool (``sampling.non_finite``): a row keeps the tokens before its
            first such one and stops there.
    """

    new_tokens: torch.Tensor
    new_counts: torch.Tensor
    draft_tokens: torch.Tensor
    accepted_counts: torch.Tensor
    non_finite: torch.Tensor | None = None
    # Set when the step is settled (``settled``, or inside a compiled step): tokens each row
    # keeps [batch], why rows stop after it [batch] (``bookkeeping``), and both with the new
    # tokens in one tensor for the host (``bookkeeping.settle``).
    kept: torch.Tensor | None = None
    reasons: torch.Tensor | None = None
    summary: torch.Tensor | None = None

    def select_rows(self, index: torch.Tensor) -> StepResult:
        """The result of the rows at ``index`` (in that order; a settled step)."""
        new_tokens, kept, reasons = self.new_tokens[index], self.kept[index], self.reasons[index]
        return StepResult(
            new_tokens,
            self.new_counts[index],
            self.draft_tokens[index],
            self.accepted_counts[index],
            None if self.non_finite is None else self.non_finite[index],
            kept,
            reasons,
            summary(kept, reasons, new_tokens),
        )


def settled(step: StepResult, books: RowBooks, made: int | torch.Tensor | None) -> StepResult:
    """``step`` with its bookkeeping (``bookkeeping.settle``; ``made``: drafts made, None
    for a prompt's first token, which is not a counted step); ``books`` takes the rows'
    new totals."""
    kept, generated, reasons, statistics, for_host = settle(
        step.new_tokens,
        step.new_counts,
        step.non_finite,
        step.accepted_counts,
        made,
        *books.tensors(),
    )
    books.update(generated, reasons, statistics)
    return dataclasses.replace(step, kept=kept, reasons=reasons, summary=for_host)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, capacity: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts -> (token buffer [batch, capacity], pad_counts [batch], prompt width)."""
    width = max(len(prompt) for prompt in prompts)
    # Built on the host whatever torch.set_default_device says (a "meta" default device
    # cannot be copied out of), then moved.
    host = torch.device("cpu")
    tokens = torch.full((len(prompts), capacity), pad_token_id, dtype=torch.long, device=host)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) : width] = torch.tensor(
            list(prompt), dtype=torch.long, device=host
        )
    pad_counts = torch.tensor([width - len(prompt) for prompt in prompts], device=host)
    return tokens.to(device), pad_counts.to(device), width


def _from_counted_step(
    outputs: tuple[torch.Tensor, ...], state: DecodingState, books: RowBooks, made: int = 0
) -> StepResult:
    """The result of a compiled step with its bookkeeping (``ForwardPasses.decode_step``,
    ``counted_greedy_step``); ``state`` and ``books`` take the new tensors."""
    (tokens, lengths, new_tokens, counts, drafts, accepted, bad, kept, *totals, for_host) = outputs
    state.tokens, state.lengths = tokens, lengths
    books.update(*totals)
    return StepResult(
        new_tokens, counts, drafts[:, :made], accepted, bad, kept, books.reason, for_host
    )


class GenerationStrategy(abc.ABC):
    """A decoding strategy.

    Args:
        passes: the model's forward passes (eager or compiled).
        config: resolved generation settings (exit_layer / num_speculations filled in).
        selector: turns logits into tokens.
    """

    name: ClassVar[GenerationStrategyName]
    # Whether a step reads the device to decide what it runs (then issuing the next step
    # ahead of the generator's read gains nothing: ``Generator.steps_ahead``).
    reads_device_each_step: ClassVar[bool] = False

    def __init__(
        self, passes: ForwardPasses, config: GenerationConfig, selector: TokenSelector
    ) -> None:
        self.passes = passes
        self.model = passes.model
        self.config = config
        self.selector = selector
        # [value] on the model's device for every draft count 0 .. k, made here: a host number
        # copied to a GPU during a step would make the host wait for the device.
        self._counts = [
            torch.tensor([value], device=self.model.device)
            for value in range(max(config.num_speculations, 0) + 1)
        ]

    def _count(self, value: int) -> torch.Tensor:
        return self._counts[value]

    @property
    def _compiled_greedy(self) -> bool:
        """Greedy decoding without logits processors on the compiled path: what a step
        needs to run whole in compiled calls (argmax inside them)."""
        return (
            self.passes.compiled
            and not self.selector.sample
            and not self.selector.context_processors
        )

    @property
    def _compiled_sampled(self) -> bool:
        """Sampling (temperature, top-k, top-p) without logits processors on the compiled
        path: the draws run inside the compiled calls too (``sampling.draw``), with numbers
        drawn before each step (``TokenSelector.uniforms``), as eager decoding draws them."""
        return (
            self.passes.compiled and self.selector.sample and not self.selector.context_processors
        )

    @property
    @abc.abstractmethod
    def prefill_layers(self) -> int:
        """How many layers the prompt runs through."""

    @property
    def lookahead(self) -> int:
        """Columns a step may write past its last kept token (drafts that get rejected)."""
        return 1

    @abc.abstractmethod
    def pass_keys(self, batch_size: int) -> list[tuple]:
        """The ``ForwardPasses`` keys a step at ``batch_size`` rows calls (what must be
        compiled before a batch may shrink to that size without compiling mid-run)."""

    def can_run(self, batch_size: int) -> bool:
        """Whether a step at ``batch_size`` rows runs without compiling anything."""
        return self.passes.ready(self.pass_keys(batch_size))

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        pad_token_id: int,
        max_new_tokens: int,
        first_token_allowed: torch.Tensor | None = None,
    ) -> DecodingState:
        """Run the prompts and append each row's first generated token.

        Args:
            first_token_allowed: which tokens each row's first generated token may be,
                [batch, vocab] bool (token healing); None: any.
        """
        device = self.model.device
        width = max(len(prompt) for prompt in prompts)
        cache = self.passes.new_cache(len(prompts), width + max_new_tokens + self.lookahead)
        # As many columns as the cache (compiled: its capacity bucket, so that a compiled
        # step's token buffer keeps one shape, and one CUDA graph, across generations).
        tokens, pad_counts, width = left_pad(prompts, pad_token_id, cache.capacity, device)
        state = DecodingState(tokens, torch.full_like(pad_counts, width), pad_counts, width, cache)
        logits = self.passes.prefill(
            tokens[:, :width], cache, pad_counts, self.prefill_layers
        )  # [batch, vocab]
        broken = non_finite(logits)  # [batch]
        if bool(broken.any()):
            which = "the prompt" if len(prompts) == 1 else f"prompts[{int(broken.nonzero()[0])}]"
            raise UnsupportedModelError(
                f"the model produced NaN or infinite logits for {which} (an overflowing "
                "dtype such as float16? try bfloat16 or float32)"
            )
        if first_token_allowed is not None:
            logits = logits.masked_fill(~first_token_allowed, float("-inf"))
        first_tokens, empty = self._choose_allowed(
            logits, state, healing=first_token_allowed is not None
        )
        if empty is not None and self.selector.context_processors and bool(empty.any()):
            which = "the prompt" if len(prompts) == 1 else f"prompts[{int(empty.nonzero()[0])}]"
            raise ConfigError(
                f"sampling: the logits processors (no_repeat_ngram_size; the checkpoint's "
                f"repetition penalty, bad words, suppressed tokens) leave no token to follow "
                f"{which} (every one banned, or its logits overflowed)"
            )
        state.write(first_tokens[:, None], torch.ones_like(pad_counts))
        return state

    @property
    def _reduced_vocabulary(self) -> bool:
        """Tokens come from an early exit's reduced draft vocabulary (early-exit decoding
        with ``draft_vocab_size``), which the logits processors can ban entirely."""
        draft = self.passes.draft
        return (
            self.prefill_layers < self.passes.model.num_layers
            and draft is not None
            and draft.vocab is not None
        )

    def _choose_allowed(
        self,
        logits: torch.Tensor,
        state: DecodingState,
        healing: bool,
        uniform: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next token of every row [batch] from ``logits`` [batch, vocab], where what
        healing or the reduced vocabulary rule out is at -inf; a ConfigError when the logits
        processors ban every token a row may still take after healing, or greedily over a
        reduced vocabulary (the choice would be a banned token). Also, when sampling, the
        rows the processors left nothing to draw from [batch] bool (``TokenSelector.choose``;
        None when greedy): the generator stops them before that token. ``uniform``: the
        numbers [batch] a sampled choice draws with (``DecodingState.uniforms``); None: new
        ones for these rows."""
        # Sampling over a reduced vocabulary stops a row the processors leave nothing in
        # (as over the full one); greedy would choose a banned token outside it.
        restricted = healing or (self._reduced_vocabulary and not self.selector.sample)
        try:
            tokens, _, empty = self.selector.choose(
                logits,
                state.tokens,
                state.pad_counts,
                state.lengths,
                require_allowed=restricted,
                uniform=uniform,
            )
        except NoAllowedToken as banned:
            processors = (
                "the logits processors (no_repeat_ngram_size; the checkpoint's repetition "
                "penalty, bad words, suppressed tokens)"
            )
            if healing:
                raise ConfigError(
                    f"token healing: {processors} ban every token that may follow prompt "
                    f"{banned.row}'s healed end; use token_healing=False (--token_healing False)"
                ) from None
            raise ConfigError(
                f"early-exit decoding over a draft vocabulary of {len(self.passes.draft.vocab)} "
                f"tokens: {processors} ban all of them for row {banned.row}; use a larger "
                "--draft_vocab_size, or drop the constraint"
            ) from None
        return tokens, empty

    @abc.abstractmethod
    def step(self, state: DecodingState, num_drafts: int, active: torch.Tensor) -> StepResult:
        """Advance the active rows of ``state`` by one step.

        Args:
            state: the batch.
            num_drafts: drafts to make this step (self-speculative; <= k).
            active: which rows are unfinished, [batch] bool; the others do not advance.
        """

    def counted_step(self, state: DecodingState, num_drafts: int, books: RowBooks) -> StepResult:
        """A step of the rows still running (``books.reason`` 0) and its bookkeeping
        (``settled``): the generator's call. Strategies whose compiled step keeps the books
        itself (one compiled call per step) override it."""
        step = self.step(state, num_drafts, books.reason == 0)
        return settled(step, books, step.draft_tokens.shape[1])


class AutoRegressiveGenerationStrategy(GenerationStrategy):
    """One token per step from layers [0, E); E == L is ordinary decoding."""

    name = GenerationStrategyName.AUTOREGRESSIVE

    @property
    def prefill_layers(self) -> int:
        return self.config.exit_layer

    @property
    def _books_in_step(self) -> bool:
        """The step, its token write and its bookkeeping in one compiled call
        (``decode_step``, ``sampled_decode_step``)."""
        return self._compiled_greedy or self._compiled_sampled

    def pass_keys(self, batch_size: int) -> list[tuple]:
        exit_layer = self.config.exit_layer
        if self._compiled_sampled:
            return [
                ForwardPasses.sampled_decode_step_key(exit_layer, batch_size, self.selector.warp)
            ]
        if self._books_in_step:
            return [ForwardPasses.decode_step_key(exit_layer, batch_size)]
        return [ForwardPasses.early_key(exit_layer, batch_size)]

    def counted_step(self, state: DecodingState, num_drafts: int, books: RowBooks) -> StepResult:
        if not self._books_in_step:
            return super().counted_step(state, num_drafts, books)
        if self._compiled_sampled:
            outputs = self.passes.sampled_decode_step(
                state.tokens,
                state.lengths,
                state.cache,
                state.pad_counts,
                state.uniforms(self.selector, 1),
                books.tensors(),
                self.config.exit_layer,
                self.selector.warp,
            )
        else:
            outputs = self.passes.decode_step(
                state.tokens,
                state.lengths,
                state.cache,
                state.pad_counts,
                books.tensors(),
                self.config.exit_layer,
            )
        return _from_counted_step(outputs, state, books)

    def step(self, state: DecodingState, num_drafts: int, active: torch.Tensor) -> StepResult:
        logits, _ = self.passes.early(
            state.pending_tokens(),
            state.lengths[:, None] - 1,
            state.cache,
            state.pad_counts,
            self.config.exit_layer,
        )  # [batch, vocab]
        bad = non_finite(logits)  # [batch]
        if self.selector.sample:
            logits = finite_or_uniform(logits, bad)
        uniform = state.uniforms(self.selector, 1)[:, 0] if self.selector.sample else None
        tokens, empty = self._choose_allowed(logits, state, healing=False, uniform=uniform)
        if empty is not None:  # nothing to draw from: the row stops before this token
            bad = bad | empty
        counts = active.long()  # [batch]
        state.write(tokens[:, None], counts)
        no_drafts = tokens[:, None][:, :0]
        return StepResult(
            tokens[:, None], counts, no_drafts, torch.zeros_like(counts), bad[:, None]
        )


class SelfSpeculativeGenerationStrategy(GenerationStrategy):
    """Draft with layers [0, E), verify with layers [E, L) reusing the drafts' work.

    One step (LayerSkip §5): draft up to k tokens autoregressively with the early exit,
    keeping the exit-layer hidden states (the exit query cache); run the last draft
    through layers [0, E); verify all k + 1 positions in one pass through layers [E, L)
    starting from the kept states; accept per row. Rolling back is free: each row's next
    step writes from its first rejected column.
    """

    name = GenerationStrategyName.SELF_SPECULATIVE
    # Greedy compiled steps in one call (``_fused_step``); benchmarks/engine.py turns it off
    # to time the two-call step against it in one run.
    one_call_greedy_step = True

    @property
    def prefill_layers(self) -> int:
        return self.model.num_layers

    @property
    def lookahead(self) -> int:
        # A row may end up to k past its limit (it keeps every accepted draft), and a
        # finished row's columns are still written (and ignored) while others go on.
        return 2 * (self.config.num_speculations + 1)

    def pass_keys(self, batch_size: int) -> list[tuple]:
        k, exit_layer = self.config.num_speculations, self.config.exit_layer
        if self._books_in_step and self._fused_sampled_step:
            warp = self.selector.warp
            return [ForwardPasses.counted_sampled_step_key(exit_layer, batch_size, k, warp)]
        if self._books_in_step:
            return [ForwardPasses.counted_greedy_step_key(exit_layer, batch_size, k)]
        return self.speculate_keys(batch_size)

    def speculate_keys(self, batch_size: int) -> list[tuple]:
        """The keys of the passes ``_speculate`` calls (a step without its bookkeeping)."""
        k, exit_layer = self.config.num_speculations, self.config.exit_layer
        if self._fused_sampled_step:
            return [ForwardPasses.sampled_step_key(exit_layer, batch_size, k, self.selector.warp)]
        if self._fused_step:
            return [ForwardPasses.greedy_step_key(exit_layer, batch_size, k)]
        drafts = (
            ForwardPasses.greedy_drafts_key(exit_layer, batch_size, k)
            if self._fused_drafts
            else ForwardPasses.early_key(exit_layer, batch_size)
        )
        return [drafts, ForwardPasses.verify_key(exit_layer, batch_size, k + 1)]

    @property
    def _fused_drafts(self) -> bool:
        """Greedy drafts without logits processors or a confidence stop on the compiled
        path: all k drafts in one compiled call."""
        return self._compiled_greedy and self.config.draft_confidence_threshold <= 0

    @property
    def _fused_step(self) -> bool:
        """Drafting, verification and acceptance in one compiled call
        (``ForwardPasses.greedy_step``) where the drafts can be fused; with
        ``one_call_greedy_step`` off, drafts and verification are two calls."""
        return self.one_call_greedy_step and self._fused_drafts

    @property
    def _fused_sampled_step(self) -> bool:
        """Sampled drafting, verification and speculative acceptance in one compiled call
        (``ForwardPasses.sampled_step``): without logits processors or a confidence stop."""
        return self._compiled_sampled and self.config.draft_confidence_threshold <= 0

    @property
    def _books_in_step(self) -> bool:
        """The fused step with its token write and bookkeeping in one compiled call: the
        plain chain's step only (a strategy that steps or speculates otherwise keeps its
        books outside, as ``adaptive`` does, or in a step of its own, as trees do)."""
        kind, chain = type(self), SelfSpeculativeGenerationStrategy
        plain = kind.step is chain.step and kind._speculate is chain._speculate
        return plain and (self._fused_step or self._fused_sampled_step)

    def _step_uniforms(self, state: DecodingState) -> torch.Tensor | None:
        """The numbers a sampled step draws with, [batch, 2k + 1]
        (``TokenSelector.uniforms``); None when greedy."""
        if not self.selector.sample:
            return None
        return state.uniforms(self.selector, 2 * self.config.num_speculations + 1)

    def counted_step(self, state: DecodingState, num_drafts: int, books: RowBooks) -> StepResult:
        if not self._books_in_step:
            return super().counted_step(state, num_drafts, books)
        k, exit_layer = self.config.num_speculations, self.config.exit_layer
        made = max(1, min(num_drafts, k))
        # Always k drafts (one compiled shape); verification uses the first ``made``.
        head = (state.tokens, state.lengths, state.cache, state.pad_counts, self._count(made))
        if self._fused_sampled_step:
            outputs = self.passes.counted_sampled_step(
                *head, self._step_uniforms(state), books.tensors(), exit_layer, k,
                self.selector.warp,
            )  # fmt: skip
        else:
            outputs = self.passes.counted_greedy_step(*head, books.tensors(), exit_layer, k)
        return _from_counted_step(outputs, state, books, made)

    def _draft(
        self, state: DecodingState, num_drafts: int, uniforms: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Draft up to ``num_drafts`` tokens per row with layers [0, E).

        Drafts are written into the token buffer after each row's pending token (context
        processors read them there); verification overwrites what it rejects.

        Returns:
            draft tokens [batch, k] (-1 past the drafts made), exit-layer states
            [batch, k + 1, hidden] (pending token and drafts; zero past them), draft
            distributions [batch, k, vocab] when sampling, and the number of drafts made.
        """
        k, exit_layer = self.config.num_speculations, self.config.exit_layer
        draft_probs: list[torch.Tensor | None] = []  # greedy: no distributions
        if self._fused_drafts:
            # Always k drafts (one compiled shape); verification uses the first num_drafts.
            drafts, exit_states = self.passes.greedy_drafts(
                state.pending_tokens(),
                state.lengths[:, None] - 1,
                state.cache,
                state.pad_counts,
                exit_layer,
                k,
            )  # [batch, k], [batch, k, hidden]
            draft_tokens = drafts[:, :num_drafts]  # [batch, made]
            exit_states = exit_states[:, :num_drafts]  # [batch, made, hidden]
        else:
            draft_tokens, exit_states, draft_probs = self._draft_one_by_one(
                state, num_drafts, uniforms
            )
        made = draft_tokens.shape[1]
        missing = k - made
        draft_tokens = torch.nn.functional.pad(draft_tokens, (0, missing), value=-1)
        states = torch.nn.functional.pad(exit_states, (0, 0, 0, k + 1 - made))
        stacked_probs = None  # [batch, k, vocab]
        if self.selector.sample:
            probs = torch.stack(draft_probs, dim=1)  # [batch, made, vocab]
            stacked_probs = torch.nn.functional.pad(probs, (0, 0, 0, missing))
        return draft_tokens, states, stacked_probs, made

    def _draft_one_by_one(
        self, state: DecodingState, num_drafts: int, uniforms: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Drafts through one ``early`` call each, with the selector's processors and the
        confidence stop; when sampling, draft i draws with ``uniforms[:, i]``.

        Returns:
            Draft tokens [batch, made], the exit-layer states of the pending token and
            the drafts but the last [batch, made, hidden], and each draft's distribution
            [batch, vocab] (None when greedy).
        """
        exit_layer = self.config.exit_layer
        exit_states = []  # [batch, 1, hidden] per position
        draft_probs = []  # [batch, vocab] per draft, when sampling
        drafts = []  # [batch] per draft
        tokens = state.pending_tokens()  # [batch, 1]
        for i in range(num_drafts):
            logits, hidden = self.passes.early(
                tokens, state.lengths[:, None] - 1 + i, state.cache, state.pad_counts, exit_layer
            )
            exit_states.append(hidden)
            if self.selector.sample:  # a draft only proposes: a broken one is just rejected
                logits = finite_or_uniform(logits, non_finite(logits))
            chosen, probs, _ = self.selector.choose(
                logits,
                state.tokens,
                state.pad_counts,
                state.lengths + i,
                uniform=None if uniforms is None else uniforms[:, i],
            )  # [batch], [batch, vocab] or None
            drafts.append(chosen)
            draft_probs.append(probs)
            tokens = chosen[:, None]
            if self.selector.context_processors:  # later drafts' processors read it
                state.tokens.scatter_(1, state.lengths[:, None] + i, tokens)
            threshold = self.config.draft_confidence_threshold
            if threshold > 0 and i + 1 < num_drafts:
                confidence = (
                    probs if probs is not None else torch.softmax(logits.float(), dim=-1)
                ).amax(dim=-1)  # [batch]
                if bool((confidence < threshold).any()):
                    break  # an unsure draft is likely rejected: verify what we have
        return torch.stack(drafts, dim=1), torch.cat(exit_states, dim=1), draft_probs

    def step(self, state: DecodingState, num_drafts: int, active: torch.Tensor) -> StepResult:
        new_tokens, accepted_counts, draft_tokens, bad = self._speculate(state, num_drafts)
        counts = (accepted_counts + 1) * active  # [batch]
        state.write(new_tokens, counts)
        return StepResult(new_tokens, counts, draft_tokens, accepted_counts, bad)

    def _speculate(
        self, state: DecodingState, num_drafts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draft, verify and accept for every row (``state`` is not written).

        Returns:
            The step's new tokens [batch, k + 1] (the first ``accepted + 1`` of each row
            count), the accepted counts [batch], the drafts made [batch, made] and where the
            logits that chose the new tokens were not finite [batch, k + 1].
        """
        k, exit_layer = self.config.num_speculations, self.config.exit_layer
        num_drafts = max(1, min(num_drafts, k))
        if self._fused_sampled_step:
            new_tokens, accepted_counts, draft_tokens, bad = self.passes.sampled_step(
                state.pending_tokens(),
                state.lengths,
                state.cache,
                state.pad_counts,
                self._count(num_drafts),
                self._step_uniforms(state),
                exit_layer,
                k,
                self.selector.warp,
            )  # [batch, k + 1], [batch], [batch, k], [batch, k + 1]
            made = num_drafts
        elif self._fused_step:
            # Always k drafts (one compiled shape); verification uses the first num_drafts.
            new_tokens, accepted_counts, draft_tokens, bad = self.passes.greedy_step(
                state.pending_tokens(),
                state.lengths,
                state.cache,
                state.pad_counts,
                self._count(num_drafts),
                exit_layer,
                k,
            )  # [batch, k + 1], [batch], [batch, k], [batch, k + 1]
            made = num_drafts
        else:
            new_tokens, accepted_counts, draft_tokens, made, bad = self._draft_and_verify(
                state, num_drafts
            )
        return new_tokens, accepted_counts, draft_tokens[:, :made], bad

    def _draft_and_verify(
        self, state: DecodingState, num_drafts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """A step through separate passes: drafts, verification, acceptance.

        Returns:
            The step's new tokens [batch, k + 1], accepted counts [batch], drafts [batch, k]
            (-1 past the drafts made), the number of drafts made and where the
            verification logits were not finite [batch, k + 1].
        """
        k, exit_layer = self.config.num_speculations, self.config.exit_layer
        uniforms = self._step_uniforms(state)
        draft_tokens, exit_states, draft_probs, made = self._draft(state, num_drafts, uniforms)
        last_tokens = draft_tokens[:, made - 1 : made]  # [batch, 1]
        # Compiled passes keep one shape (k + 1 positions); eager ones verify only the
        # positions drafted (a k far above the tokens left verified k + 1 every step).
        positions = k + 1 if self.passes.compiled else made + 1
        columns = state.lengths[:, None] - 1 + torch.arange(positions, device=state.lengths.device)
        target_logits = self.passes.verify(
            last_tokens,
            exit_states[:, :positions],
            self._count(made),
            columns,
            state.cache,
            state.pad_counts,
            exit_layer,
        )  # [batch, positions, vocab]
        bad = non_finite(target_logits)  # [batch, positions]
        unverified = k + 1 - positions
        if self.selector.sample:
            target_logits = finite_or_uniform(target_logits, bad)
            target_probs, empty = self.selector.distributions(
                target_logits, state.tokens, state.pad_counts, state.lengths
            )  # [batch, positions, vocab], [batch, positions]
            bad = bad | empty  # nothing to draw there: the row stops before that token
            # Zero past the drafts, which are never accepted: the draws are a k-step's.
            target_probs = torch.nn.functional.pad(target_probs, (0, 0, 0, unverified))
            accepted_counts, next_tokens = speculative_accept(
                draft_tokens, draft_probs, target_probs, uniforms=uniforms[:, k:]
            )
        else:
            target_tokens = self.selector.greedy_tokens(
                target_logits, state.tokens, state.pad_counts, state.lengths
            )  # [batch, positions]
            accepted_counts, next_tokens = greedy_accept(
                draft_tokens[:, : positions - 1], target_tokens
            )
        new_tokens = kept_tokens(draft_tokens, accepted_counts, next_tokens)
        bad = torch.nn.functional.pad(bad, (0, unverified), value=False)  # [batch, k + 1]
        return new_tokens, accepted_counts, draft_tokens, made, bad


class TreeGenerationStrategy(SelfSpeculativeGenerationStrategy):
    """Self-speculation over token trees drafted from the early exit (``trees``).

    Each step drafts a static tree (the early exit's most likely tokens at each node,
    ``tree_branching``), verifies all of it in one pass through layers [E, L) and accepts
    the path the full model's choices follow: greedy, the output is autoregressive
    decoding's, token for token; sampled, each new token is a draw from the full model
    (``trees``), so the output keeps its distribution. Logits processors and the
    confidence stop need each draft's own context or a chain: refused
    (``trees.tree_refusal``).
    """

    name = GenerationStrategyName.TREE

    def __init__(
        self, passes: ForwardPasses, config: GenerationConfig, selector: TokenSelector
    ) -> None:
        super().__init__(passes, config, selector)
        reason = tree_refusal(bool(selector.context_processors), config.draft_confidence_threshold)
        if reason:  # here too: a checkpoint's own processors are known only now
            raise ConfigError(f"generation_strategy 'tree': {reason}")
        branching = config.tree_branching or default_branching(config.num_speculations)
        self.tree = TokenTree(tuple(branching))

    @property
    def lookahead(self) -> int:
        # A row may end up depth past its limit, and a finished row's step still writes
        # the whole tree after its last column.
        return self.tree.depth + self.tree.num_nodes + 1

    @property
    def _books_in_step(self) -> bool:
        """On the compiled path, the tree step with its token write and bookkeeping in
        one compiled call (``ForwardPasses.counted_tree_step``)."""
        return self.passes.compiled

    def pass_keys(self, batch_size: int) -> list[tuple]:
        if self._books_in_step:
            key = ForwardPasses.counted_tree_step_key
            return [
                key(self.config.exit_layer, batch_size, self.tree.branching, self.selector.warp)
            ]
        return self.speculate_keys(batch_size)

    def speculate_keys(self, batch_size: int) -> list[tuple]:
        exit_layer, branching = self.config.exit_layer, self.tree.branching
        return [ForwardPasses.tree_step_key(exit_layer, batch_size, branching, self.selector.warp)]

    def _tree_uniforms(self, state: DecodingState) -> torch.Tensor | None:
        """When sampling, one number per depth: the full model's choice after each node."""
        if not self.selector.sample:
            return None
        return state.uniforms(self.selector, self.tree.depth + 1)

    def counted_step(self, state: DecodingState, num_drafts: int, books: RowBooks) -> StepResult:
        if not self._books_in_step:
            return GenerationStrategy.counted_step(self, state, num_drafts, books)
        outputs = self.passes.counted_tree_step(
            state.tokens, state.lengths, state.cache, state.pad_counts, books.tensors(),
            self.config.exit_layer, self.tree, self._tree_uniforms(state), self.selector.warp,
        )  # fmt: skip
        return _from_counted_step(outputs, state, books, self.tree.depth)

    def _speculate(
        self, state: DecodingState, num_drafts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.passes.tree_step(
            state.pending_tokens(),
            state.lengths,
            state.cache,
            state.pad_counts,
            self.config.exit_layer,
            self.tree,
            self._tree_uniforms(state),
            self.selector.warp,
        )  # [batch, depth + 1], [batch], [batch, depth], [batch, depth + 1]


class AdaptiveGenerationStrategy(SelfSpeculativeGenerationStrategy):
    """Self-speculative chains whose length (and exit) each step follows the acceptance
    (``adaptive``).

    Each step drafts 1, 2, 4, ... or k tokens (k = num_speculations) from exit E, or from one
    of ``adaptive_exit_layers`` when given: the (exit, length) whose expected tokens per unit
    of cost is highest given each row's recent acceptance (``adaptive.DraftPolicy``). Each
    pair is one compiled shape. A step is the ``self_speculative`` step with that E and k, so
    greedy output is autoregressive decoding's and sampling keeps the target distribution:
    the choice depends only on earlier steps.
    """

    name = GenerationStrategyName.ADAPTIVE
    reads_device_each_step = True  # the policy chooses each step's chain from the statistics

    def __init__(
        self, passes: ForwardPasses, config: GenerationConfig, selector: TokenSelector
    ) -> None:
        super().__init__(passes, config, selector)
        exits = sorted({config.exit_layer, *(config.adaptive_exit_layers or [])})
        if len(exits) > 1 and passes.draft is not None and passes.draft.adapter is not None:
            raise ConfigError(
                "adaptive_exit_layers: the draft adapter serves the exit it was trained for "
                f"({passes.draft.exit_layer}) only"
            )
        self.exit_layers = tuple(exits)
        self.draft_lengths = default_lengths(config.num_speculations)
        self.chains = {
            (exit_layer, length): SelfSpeculativeGenerationStrategy(
                passes,
                dataclasses.replace(
                    config,
                    generation_strategy=GenerationStrategyName.SELF_SPECULATIVE,
                    exit_layer=exit_layer,
                    num_speculations=length,
                    adaptive_exit_layers=None,
                ),
                selector,
            )
            for exit_layer in self.exit_layers
            for length in self.draft_lengths
        }
        self.head_layers = passes.model.head_cost_in_layers()
        self.row_cost = row_cost(passes.model.device)

    def speculate_keys(self, batch_size: int) -> list[tuple]:
        return [key for chain in self.chains.values() for key in chain.speculate_keys(batch_size)]

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        pad_token_id: int,
        max_new_tokens: int,
        first_token_allowed: torch.Tensor | None = None,
    ) -> DecodingState:
        state = super().prefill(prompts, pad_token_id, max_new_tokens, first_token_allowed)
        state.draft_policy = DraftPolicy(
            self.exit_layers,
            self.draft_lengths,
            self.model.num_layers,
            self.head_layers,
            self.row_cost,
            batch_size=len(prompts),
            overhead=pass_overhead(self.model.device, self.passes.compiled),
        )
        return state

    def step(self, state: DecodingState, num_drafts: int, active: torch.Tensor) -> StepResult:
        if not self.selector.sample:
            # Compiled: every shape on the first step, so that none compiles in the middle of
            # a timed run. A discarded greedy step changes nothing: the state is not written,
            # and every cache column it wrote (any exit) is rewritten, in every layer, before
            # it is read.
            for (_, length), chain in self.chains.items():
                if not self.passes.ready(chain.speculate_keys(len(state.lengths))):
                    chain._speculate(state, min(num_drafts, length))
        policy = state.draft_policy
        exit_layer, length = policy.choose(active)
        # Near a row's token limit the generator asks for fewer drafts: the chain of this
        # length drafts them (its compiled shape verifies the first num_drafts).
        chain = self.chains[exit_layer, length]
        new_tokens, accepted_counts, draft_tokens, bad = chain._speculate(
            state, min(num_drafts, length)
        )
        counts = (accepted_counts + 1) * active  # [batch]
        state.write(new_tokens, counts)
        policy.update(exit_layer, draft_tokens.shape[1], accepted_counts, active)
        return StepResult(new_tokens, counts, draft_tokens, accepted_counts, bad)


STRATEGIES: dict[GenerationStrategyName, type[GenerationStrategy]] = {
    strategy.name: strategy
    for strategy in (
        AutoRegressiveGenerationStrategy,
        SelfSpeculativeGenerationStrategy,
        TreeGenerationStrategy,
        AdaptiveGenerationStrategy,
    )
}


def build_strategy(
    passes: ForwardPasses, config: GenerationConfig, selector: TokenSelector
) -> GenerationStrategy:
    """The registered strategy for ``config.generation_strategy``.

    Raises:
        ArgumentTypeError: an argument of another type, named.
    """
    for name, value, expected in (
        ("passes", passes, ForwardPasses),
        ("config", config, GenerationConfig),
        ("selector", selector, TokenSelector),
    ):
        if not isinstance(value, expected):
            raise ArgumentTypeError(
                f"{name} must be a {expected.__name__}, got {type(value).__name__}"
            )
    strategy_class = STRATEGIES[GenerationStrategyName(config.generation_strategy)]
    return strategy_class(passes, config, selector)
