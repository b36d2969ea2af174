"""Token selection and speculative acceptance as pure functions of logits/probabilities.

Nothing here calls a model. Terms (see the package docstring): the draft distribution q
comes from the early exit, the target distribution p from the full model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers import GenerationConfig as CheckpointGenerationConfig
from transformers import (
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from self_speculation.config import GenerationConfig


def compared_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype greedy decoding compares logits of ``dtype`` in: float32 for float64 (as
    transformers' ``generate`` casts every step's logits to float32 before its argmax, so two
    float64 logits within float32 rounding of each other tie, and the lower token id wins);
    ``dtype`` itself for the others (float32 holds bfloat16 and float16 exactly)."""
    return torch.float32 if dtype == torch.float64 else dtype


def compared(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` [..., vocab] as greedy decoding compares them (``compared_dtype``): what
    every greedy argmax takes, so that a float64 model decodes as ``generate`` decodes it,
    with or without logits processors (which work in float32)."""
    return logits.to(compared_dtype(logits.dtype))


def build_logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """The processors implied by ``config``, in the order transformers' generate uses.

    Greedy decoding keeps only the processors that can change the argmax.
    """
    return LogitsProcessorList([*_context_processors(config), *_warpers(config)])


# What _context_processors reads of a checkpoint's generation config.
CHECKPOINT_PROCESSOR_SETTINGS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "eos_token_id",
)


def _context_processors(
    config: GenerationConfig, checkpoint: CheckpointGenerationConfig | None = None
) -> LogitsProcessorList:
    """Processors that read each row's tokens: the checkpoint's repetition penalty, then
    no-repeat-n-gram (``config``'s, else the checkpoint's), bad words and suppressed tokens,
    in the order transformers' ``generate`` applies them (greedy decoding included), so that
    a checkpoint decodes as ``generate`` decodes it."""
    processors = LogitsProcessorList()
    penalty = getattr(checkpoint, "repetition_penalty", None)
    if penalty is not None and penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    ngram = config.no_repeat_ngram_size  # 0: off, the checkpoint's too
    if ngram is None:
        ngram = getattr(checkpoint, "no_repeat_ngram_size", None)
    if ngram is not None and ngram > 0:  # 0 or below: off, as in transformers
        processors.append(NoRepeatNGramLogitsProcessor(ngram))
    bad_words = getattr(checkpoint, "bad_words_ids", None)
    if bad_words:
        # End-of-sequence ids are never banned as single-token bad words; config's stop
        # ids are more of them (as eos_token_id=[...] passed to generate would be).
        eos = getattr(checkpoint, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        stops = sorted({*eos, *(config.stop_token_ids or [])})
        processors.append(NoBadWordsLogitsProcessor(bad_words, stops or None))
    suppressed = getattr(checkpoint, "suppress_tokens", None)
    if suppressed:
        processors.append(SuppressTokensLogitsProcessor(suppressed))
    return processors


def applied_checkpoint_settings(
    checkpoint: CheckpointGenerationConfig | None, configs: Sequence[GenerationConfig] = ()
) -> dict:
    """The settings of ``checkpoint`` (a model's generation config) that decoding with
    ``configs`` applies (``_context_processors``: a run's own no_repeat_ngram_size replaces
    the checkpoint's) where they are not neutral, and its end-of-sequence ids: they change
    the tokens as much as the GenerationConfig does, and a results file records them
    beside it."""
    replaced = (
        {"no_repeat_ngram_size"}
        if configs and all(config.no_repeat_ngram_size is not None for config in configs)
        else set()
    )
    settings = {}
    for name in CHECKPOINT_PROCESSOR_SETTINGS:
        if name in replaced:
            continue
        value = getattr(checkpoint, name, None)
        neutral = (
            value is None
            or value in ([], ())
            or (name == "repetition_penalty" and value == 1.0)
            or (name == "no_repeat_ngram_size" and value <= 0)
        )
        if not neutral:
            settings[name] = value
    return settings


def check_checkpoint_processors(checkpoint: object, vocab_size: int) -> None:
    """ValueError naming what is wrong when the context processors of the checkpoint's
    generation config cannot be built or run over a vocabulary of ``vocab_size`` (a
    repetition penalty of 0, bad words or suppressed tokens outside the vocabulary, ids
    that are not lists of ids): they would fail at the first generation."""
    try:
        processors = _context_processors(GenerationConfig(), checkpoint)
        processors(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, vocab_size))
    except (ValueError, TypeError, IndexError, RuntimeError) as error:
        raise ValueError(" ".join(str(error).split()) or type(error).__name__) from None


def _warpers(config: GenerationConfig) -> LogitsProcessorList:
    """transformers' sampling warpers for ``config`` (what ``warped`` computes; its tests
    compare the two)."""
    warpers = LogitsProcessorList()
    if config.sample:
        if config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k > 0:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


def warp_settings(config: GenerationConfig) -> tuple[float, int, float] | None:
    """(temperature, top_k, top_p) when ``config`` samples (``warped``), else None."""
    if not config.sample:
        return None
    return (float(config.temperature), int(config.top_k), float(config.top_p))


def warp_key(warp: tuple[float, int, float] | None) -> str | None:
    """What a compiled step that warps by ``warp`` (``warp_settings``) is compiled for: which
    warpers apply and top-k's size (a shape). The temperature's and top-p's values are the
    step's inputs (``warp_inputs``), so that a step compiled once serves every value."""
    if warp is None:
        return None
    temperature, top_k, top_p = warp
    parts = ["temperature"] * (temperature != 1.0) + [f"top-k {top_k}"] * (top_k > 0)
    return ", ".join(parts + ["top-p"] * (top_p < 1.0)) or "none"


def warp_inputs(warp: tuple[float, int, float], device: torch.device) -> tuple:
    """``warp`` as a compiled step takes it: the temperature and top-p that apply as float32
    scalar tensors on ``device``, those that do not as 1.0 (``warped`` leaves them out)."""
    temperature, top_k, top_p = warp
    as_input = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    return (
        1.0 if temperature == 1.0 else as_input(temperature),
        top_k,
        1.0 if top_p >= 1.0 else as_input(top_p),
    )


def warped(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int,
    top_p: float | torch.Tensor,
) -> torch.Tensor:
    """Logits [..., vocab] after the sampling warpers as transformers' ``generate`` applies
    them: divided by the temperature, then all but the ``top_k`` largest (0: off) and all
    outside the smallest set of largest tokens holding ``top_p`` of the probability (1.0:
    off) at -inf, keeping at least one. Tokens tied with the last one kept stay too, for
    top-k as in transformers and for top-p (where transformers keeps some of them, which
    ones depending on its sort). Tensor operations only, so that a compiled step warps
    inside its graph and draws what eager decoding draws; the temperature and top-p may be
    scalar tensors there (``warp_inputs``), which always apply."""
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        probs = logits.softmax(dim=-1, dtype=torch.float32)  # _bisected_floor: float32
        logits = logits.masked_fill(probs < _nucleus_floor(probs, top_p), float("-inf"))
    return logits


# How many of the likeliest tokens eager top-p looks at before it sorts the whole
# vocabulary: on a CPU, sorting 4096 probabilities costs about 15 times taking the largest 64,
# and a nucleus of 0.9 at temperature 0.6 rarely holds more.
NUCLEUS_CANDIDATES = 64


def _nucleus_floor(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """The smallest probability [..., 1] in each row's top-p nucleus (``probs`` [..., vocab]):
    the tokens before which, in descending order, less than ``top_p`` of the probability
    lies. Eager code looks among the ``NUCLEUS_CANDIDATES`` likeliest tokens when every row's
    nucleus ends there, else sorts the whole vocabulary; a compiled CPU step bisects
    (``_bisected_floor``: a branch inside a compiled step would need ``torch.cond``, after
    which dynamo loses attribute writes, such as the cache's write columns, in torch 2.13);
    other devices (CUDA) sort. The same rule each way, up to the rounding of the sums."""
    if probs.device.type != "cpu":  # one kernel, no branch (a CUDA graph)
        return _sorted_floor(probs, top_p)
    if torch.compiler.is_compiling():
        return _bisected_floor(probs, top_p)
    likeliest = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1).values
    # The nucleus ends among the candidates when the mass before the next token reaches top_p.
    if bool((likeliest.cumsum(dim=-1)[..., -1] >= top_p).all()):
        return _floor_of(likeliest, top_p)
    return _sorted_floor(probs, top_p)


def _sorted_floor(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """``_nucleus_floor`` by sorting the whole vocabulary."""
    return _floor_of(probs.sort(dim=-1, descending=True).values, top_p)


def _bisected_floor(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """``_nucleus_floor`` without sorting or branching: the smallest threshold above which
    less than ``top_p`` of the probability lies, found by bisecting its float32 bit pattern
    (non-negative floats order as their bits do) in 30 masked sums (a probability's bits
    are at most 1.0's, below 2**30). On a CPU, a seventh of the sort's time for 7 rows of
    4096; its result [..., 1] may lie between two probabilities: the tokens at or above it
    are the nucleus."""
    bits = probs.view(torch.int32)  # float32
    low = torch.zeros_like(bits[..., :1])  # more than top_p lies above it (or it is 0)
    high = probs.amax(dim=-1, keepdim=True).view(torch.int32)  # nothing lies above it
    for _ in range(30):
        middle = low + (high - low) // 2
        in_nucleus = (probs * (bits > middle)).sum(dim=-1, keepdim=True) < top_p
        high = torch.where(in_nucleus, middle, high)
        low = torch.where(in_nucleus, low, middle)
    return high.view(torch.float32)


def _floor_of(descending: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """The last probability [..., 1] of ``descending`` [..., n] (each row sorted, largest
    first) before which less than ``top_p`` of the probability lies (the first always)."""
    before = descending.cumsum(dim=-1) - descending  # [..., n]
    kept = (before < top_p).sum(dim=-1, keepdim=True).clamp_min(1)
    return descending.gather(-1, kept - 1)


def wide_float(device: torch.device) -> torch.dtype:
    """The widest float ``device`` computes in: float64, except on MPS and on XPUs without
    float64 (Intel Arc: float32 there). What draws are made in (``draw``,
    ``TokenSelector.uniforms``)."""
    if device.type == "mps" or (device.type == "xpu" and not _xpu_has_float64(device.index)):
        return torch.float32
    return torch.float64


@functools.cache
def _xpu_has_float64(index: int | None) -> bool:
    properties = torch.xpu.get_device_properties(index)
    return bool(getattr(properties, "has_fp64", True))


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Tokens [...] drawn from ``probs`` [..., vocab] with ``uniform`` [...] in [0, 1):
    inverse transform sampling, the first token whose cumulative probability (in float64:
    ``wide_float``) exceeds ``uniform`` times the total. A token of probability 0 is never
    drawn. Tensor operations only: a compiled step draws as eager decoding does from the
    same numbers."""
    cumulative = probs.to(wide_float(probs.device)).cumsum(dim=-1)  # [..., vocab]
    tokens = (cumulative <= uniform[..., None] * cumulative[..., -1:]).sum(dim=-1)
    # u * total rounded up to the total (u within 2**-53 of 1): the likeliest token.
    return torch.where(tokens < probs.shape[-1], tokens, probs.argmax(dim=-1))


class TokenSelector:
    """Turns logits into tokens (greedy) or distributions (sampling), for a whole batch.

    Context processors (no-repeat-n-gram) see each row's whole sequence so far (prompt +
    generated + drafted, left padding removed), never only the last token; they are the
    only part that loops over rows and positions, and only when configured. The warpers
    (temperature, top-k, top-p) run once on every row and position together.

    Token contexts are given as a token buffer with each row's left padding and length:
    position i of a call's logits predicts the token after
    ``tokens[row, pad_counts[row] : lengths[row] + i]``.

    Args:
        config: the generation settings.
        generator: random source for sampling (seeded runs are reproducible).
        checkpoint: the model's own generation config, whose sequence processors
            (repetition penalty, no-repeat-n-gram, bad words, suppressed tokens) apply as
            in transformers' ``generate``; None: none.
    """

    def __init__(
        self,
        config: GenerationConfig,
        generator: torch.Generator | None = None,
        checkpoint: CheckpointGenerationConfig | None = None,
    ) -> None:
        self.sample = config.sample
        self.context_processors = _context_processors(config, checkpoint)
        # (temperature, top_k, top_p) when sampling (``warped``); None when greedy.
        self.warp = warp_settings(config)
        self.generator = generator

    def uniforms(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Uniform numbers in [0, 1) of ``shape`` from the selector's random source: what a
        sampled step draws from (a self-speculative step of k drafts draws [batch, 2k + 1]
        at its start: k drafts, k acceptance tests, the residual or bonus token). In
        float64 (``wide_float``): with float32's 24 bits a token of probability below
        2**-24 would be drawn at a rate of 0 or 2**-24, not at its own."""
        dtype = wide_float(device)
        return torch.rand(*shape, generator=self.generator, device=device, dtype=dtype)

    def process(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        pad_counts: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Processed logits [batch, positions, vocab] (float32).

        Args:
            logits: raw logits [batch, positions, vocab].
            tokens: left-padded token buffer [batch, columns].
            pad_counts: left padding of each row, [batch].
            lengths: columns before position 0's prediction, per row, [batch].
        """
        logits = logits.float()
        batch, positions, _ = logits.shape
        if self.context_processors:
            ends = (lengths[:, None] + torch.arange(positions, device=lengths.device)).tolist()
            logits = torch.stack(
                [
                    torch.cat(
                        [
                            self.context_processors(
                                tokens[row : row + 1, int(pad_counts[row]) : ends[row][i]],
                                logits[row, i : i + 1],
                            )
                            for i in range(positions)
                        ]
                    )
                    for row in range(batch)
                ]
            )
        if self.warp is not None:
            logits = warped(logits, *self.warp)
        return logits

    def distributions(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        pad_counts: torch.Tensor,
        lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling distributions [batch, positions, vocab], and where the processors left
        nothing to draw from [batch, positions] bool (every token banned: a reduced draft
        vocabulary's, or no_repeat_ngram_size over a vocabulary the text has used up;
        logits a tiny repetition penalty overflowed): uniform there, so that a draw runs
        (speculative sampling stays exact for any draft distribution it is told; a token
        drawn for the full model there must not be kept)."""
        return _drawable(self.process(logits, tokens, pad_counts, lengths))

    def greedy_tokens(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        pad_counts: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Argmax tokens [batch, positions]."""
        if not self.context_processors:
            return compared(logits).argmax(dim=-1)  # needs no warpers
        return self.process(logits, tokens, pad_counts, lengths).argmax(dim=-1)

    def choose(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        pad_counts: torch.Tensor,
        lengths: torch.Tensor,
        require_allowed: bool = False,
        uniform: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The next token of every row from ``logits`` [batch, vocab].

        ``require_allowed``: raise ``NoAllowedToken`` for the first row whose every token
        the context processors ban (where the tokens it may take are already restricted:
        token healing, a reduced vocabulary), instead of choosing a banned token.

        Returns:
            Tokens [batch]; when sampling, the distributions they were drawn from
            [batch, vocab] and the rows the processors left nothing to draw from [batch]
            bool (``distributions``: a draft there is drawn uniformly and only proposed; any
            other token there must not be kept); None, None when greedy.

        ``uniform``: the numbers [batch] a sampled choice draws with (``draw``); None: new
        ones from the selector's random source.
        """
        logits = logits.unsqueeze(1)  # [batch, 1, vocab]
        if not self.sample and not self.context_processors:
            return compared(logits).argmax(dim=-1)[:, 0], None, None  # no warpers
        processed = self.process(logits, tokens, pad_counts, lengths)[:, 0]  # [batch, vocab]
        if require_allowed and self.context_processors:
            banned = torch.isneginf(processed.amax(dim=-1))  # [batch]
            if bool(banned.any()):
                raise NoAllowedToken(int(banned.nonzero()[0]))
        if not self.sample:
            return processed.argmax(dim=-1), None, None
        probs, empty = _drawable(processed)  # [batch, vocab], [batch]
        if uniform is None:
            uniform = self.uniforms(len(probs), device=probs.device)
        return draw(probs, uniform), probs, empty


def _drawable(processed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of processed logits [..., vocab], uniform where none is finite, and where
    that was [...] bool (``TokenSelector.distributions``)."""
    empty = non_finite(processed)
    return torch.softmax(finite_or_uniform(processed, empty), dim=-1), empty


class NoAllowedToken(Exception):
    """``TokenSelector.choose``: the logits processors ban every token row ``row`` may take
    next (the caller says why in its own terms)."""

    def __init__(self, row: int) -> None:
        super().__init__(row)
        self.row = row


def non_finite(logits: torch.Tensor) -> torch.Tensor:
    """Where ``logits`` [..., vocab] hold NaN or +inf, or are all -inf (a broken model, an
    overflowing dtype such as float16), [...] bool: the largest logit is not finite (one
    reduction; -inf on some tokens is fine)."""
    return ~torch.isfinite(logits.amax(dim=-1))


def finite_or_uniform(logits: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``logits`` with the rows marked in ``bad`` [...] replaced by zeros (a uniform
    distribution), so that sampling from them draws a token instead of failing: the
    generator drops what a broken row produced (``non_finite``), and a draft only proposes
    (its uniform distribution is the one verification is told)."""
    return torch.where(bad[..., None], 0.0, logits)


def greedy_accept(
    draft_tokens: torch.Tensor, target_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification for a batch (LayerSkip §5.2; Leviathan et al. 2023).

    Args:
        draft_tokens: [batch, k] tokens proposed by the early exit; -1 marks a slot with
            no draft (fewer drafts than k), which never matches.
        target_tokens: [batch, k + 1] full-model argmax after the pending token and each
            draft.

    Returns:
        accepted_counts [batch] (the longest prefix where draft == target) and the next
        tokens [batch]: the full model's correction at that position, or the bonus token
        when every draft was accepted.
    """
    k = draft_tokens.shape[1]
    agrees = draft_tokens == target_tokens[:, :k]  # [batch, k]
    accepted_counts = agrees.long().cumprod(dim=1).sum(dim=1)  # [batch]
    next_tokens = target_tokens.gather(1, accepted_counts[:, None])[:, 0]  # [batch]
    return accepted_counts, next_tokens


def kept_tokens(
    draft_tokens: torch.Tensor, accepted_counts: torch.Tensor, next_tokens: torch.Tensor
) -> torch.Tensor:
    """A self-speculative step's new tokens, [batch, k + 1]: row b's accepted drafts, then
    its correction / bonus token (the first ``accepted_counts[b] + 1`` count; slots past
    them hold rejected drafts, -1 slots as 0)."""
    new_tokens = torch.cat([draft_tokens.clamp_min(0), next_tokens[:, None]], dim=1)
    return new_tokens.scatter(1, accepted_counts[:, None], next_tokens[:, None])


def speculative_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling verification for a batch (Leviathan et al. 2023, Alg. 1;
    Chen et al. 2023).

    Accept draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    i, draw from norm(max(p_i - q_i, 0)); if all drafts are accepted, draw the bonus token
    from p_k. The kept tokens are distributed exactly as samples from p.

    Args:
        draft_tokens: [batch, k] tokens drawn from ``draft_probs``; -1 marks a slot with
            no draft (fewer drafts than k): never accepted, and a rejection there draws
            from p (the bonus token of the real drafts).
        draft_probs: [batch, k, vocab] draft distributions q (any values where no draft).
        target_probs: [batch, k + 1, vocab] target distributions p.
        generator: random source (when ``uniforms`` is None).
        uniforms: the numbers [batch, k + 1] in [0, 1) it draws with: the acceptance
            tests, then the residual or bonus token's (``draw``); None: new ones.

    Returns:
        accepted_counts [batch] and the next tokens [batch] (residual sample or bonus).
    """
    batch, k = draft_tokens.shape
    drafted = draft_tokens >= 0  # [batch, k]
    index = draft_tokens.clamp_min(0).unsqueeze(2)  # [batch, k, 1]
    p = target_probs[:, :k].gather(2, index)[..., 0]  # [batch, k]
    q = draft_probs.gather(2, index)[..., 0]  # [batch, k]
    if uniforms is None:
        uniforms = torch.rand(
            batch,
            k + 1,
            generator=generator,
            device=draft_tokens.device,
            dtype=wide_float(draft_tokens.device),
        )
    uniform = uniforms[:, :k]  # [batch, k]
    # u < p / q without dividing by q; strict, since torch.rand can return exactly 0, and a
    # draft the target forbids (p = 0) must never be accepted.
    accepted = (uniform * q < p) & drafted
    accepted_counts = accepted.long().cumprod(dim=1).sum(dim=1)  # [batch]
    # q at each of the k + 1 positions, zero where no draft was made (and after the last).
    q_all = torch.cat(
        [draft_probs * drafted.unsqueeze(2), draft_probs.new_zeros(batch, 1, draft_probs.shape[2])],
        dim=1,
    )  # [batch, k + 1, vocab]
    at = accepted_counts[:, None, None].expand(batch, 1, target_probs.shape[2])
    p_at = target_probs.gather(1, at)[:, 0]  # [batch, vocab]
    residual = (p_at - q_all.gather(1, at)[:, 0]).clamp_min(0)  # [batch, vocab]
    total = residual.sum(dim=1, keepdim=True)  # [batch, 1]
    # residual == 0 only when p == q, where rejection has probability 0; guard rounding.
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p_at)
    next_tokens = draw(residual, uniforms[:, k])  # [batch]
    return accepted_counts, next_tokens
