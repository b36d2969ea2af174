"""Token selection and speculative acceptance as pure functions of logits/probabilities.

Nothing here calls a model. Terms (see the package docstring): the draft distribution q
comes from the early exit, the target distribution p from the full model.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from self_speculation.config import GenerationConfig


def build_logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """The processors implied by ``config``, in the order transformers' generate uses.

    Greedy decoding keeps only the processors that can change the argmax.
    """
    processors = LogitsProcessorList()
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.sample:
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k > 0:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


class TokenSelector:
    """Turns logits into tokens (greedy) or distributions (sampling), row by row.

    Processors see each row's whole sequence so far (prompt + generated + drafted, left
    padding removed), never only the last token.

    Args:
        config: the generation settings.
        generator: random source for sampling (seeded runs are reproducible).
    """

    def __init__(self, config: GenerationConfig, generator: torch.Generator | None = None) -> None:
        self.sample = config.sample
        self.processors = build_logits_processors(config)
        self.generator = generator

    def process(
        self, context: torch.Tensor, pad_counts: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Processed logits [batch, positions, vocab].

        Args:
            context: left-padded token ids [batch, columns]; position i of ``logits``
                predicts the token after ``context[:, : columns - positions + 1 + i]``.
            pad_counts: left padding of each row, [batch].
            logits: raw logits [batch, positions, vocab].
        """
        logits = logits.float()
        if not self.processors:
            return logits
        positions = logits.shape[1]
        first = context.shape[1] - positions + 1
        rows = []
        for row in range(context.shape[0]):
            pad = int(pad_counts[row])
            rows.append(
                torch.cat(
                    [
                        self.processors(
                            context[row : row + 1, pad : first + i], logits[row, i : i + 1]
                        )
                        for i in range(positions)
                    ]
                )
            )
        return torch.stack(rows)  # [batch, positions, vocab]

    def probabilities(
        self, context: torch.Tensor, pad_counts: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Sampling distributions [batch, positions, vocab]."""
        return torch.softmax(self.process(context, pad_counts, logits), dim=-1)

    def greedy_tokens(
        self, context: torch.Tensor, pad_counts: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Argmax tokens [batch, positions]."""
        return self.process(context, pad_counts, logits).argmax(dim=-1)

    def choose(
        self, context: torch.Tensor, pad_counts: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next token of every row from ``logits`` [batch, vocab].

        Returns:
            Tokens [batch] and, when sampling, the distributions they were drawn from
            [batch, vocab].
        """
        logits = logits.unsqueeze(1)  # [batch, 1, vocab]
        if not self.sample:
            return self.greedy_tokens(context, pad_counts, logits)[:, 0], None
        probs = self.probabilities(context, pad_counts, logits)[:, 0]  # [batch, vocab]
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0], probs


def sample_token(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token from ``probs`` [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def greedy_accept(draft_tokens: torch.Tensor, target_tokens: torch.Tensor) -> tuple[int, int]:
    """Greedy verification (LayerSkip §5.2; Leviathan et al. 2023).

    Args:
        draft_tokens: [k] tokens proposed by the early exit.
        target_tokens: [k + 1] full-model argmax after the pending token and each draft.

    Returns:
        accepted_count n (the longest prefix where draft == target) and the next token:
        the full model's correction at position n, or the bonus token when n == k.
    """
    k = draft_tokens.shape[0]
    mismatch = (draft_tokens != target_tokens[:k]).nonzero()
    accepted_count = int(mismatch[0, 0]) if mismatch.numel() else k
    return accepted_count, int(target_tokens[accepted_count])


def speculative_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling verification (Leviathan et al. 2023, Alg. 1; Chen et al. 2023).

    Accept draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection,
    draw from norm(max(p_i - q_i, 0)); if all k are accepted, draw the bonus token from
    p_k. The returned tokens are distributed exactly as samples from p.

    Args:
        draft_tokens: [k] tokens drawn from ``draft_probs``.
        draft_probs: [k, vocab] draft distributions q.
        target_probs: [k + 1, vocab] target distributions p.
        generator: random source.

    Returns:
        accepted_count and the next token (residual sample or bonus).
    """
    k = draft_tokens.shape[0]
    rows = torch.arange(k, device=draft_tokens.device)
    p = target_probs[rows, draft_tokens]  # [k]
    q = draft_probs[rows, draft_tokens]  # [k]
    uniform = torch.rand(k, generator=generator, device=draft_tokens.device)  # [k]
    rejected = (uniform * q > p).nonzero()
    if not rejected.numel():
        return k, sample_token(target_probs[k], generator)
    accepted_count = int(rejected[0, 0])
    residual = (target_probs[accepted_count] - draft_probs[accepted_count]).clamp_min(0)  # [vocab]
    total = residual.sum()
    # residual == 0 only when p == q, where rejection has probability 0; guard rounding.
    residual = residual / total if total > 0 else target_probs[accepted_count]
    return accepted_count, sample_token(residual, generator)
