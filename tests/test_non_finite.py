"""Logits that turn NaN or infinite during decoding (float16 overflowing deep into a
generation, broken weights) stop the row they appear in: stop_reason "non_finite_logits",
one warning, the tokens chosen from finite logits kept, nothing raised, greedy or sampled,
in every strategy, eager and compiled.

The model is poisoned by position (eager decoding: its rotary tables NaN from ``POISON``
on, so the token at position POISON is the last one chosen from finite logits and plain
decoding keeps exactly the tokens up to it), or by token (compiled decoding too, where a
hook is not reliably traced: one token's embedding NaN, so every logit after it is NaN).
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.bookkeeping import EOS, NON_FINITE, kept_counts
from self_speculation.sampling import non_finite

POISON = 9
PROMPTS = [[100, 101, 102], [3, 4]]  # the token at position 9 is generated token 7 / 8
MAX_STEPS = 12


@pytest.fixture(scope="module")
def generator() -> Generator:
    # No end-of-sequence token: every row runs until the poison (or its limit).
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, eos_token_id=None)
    return Generator(model, IdTokenizer())


@contextlib.contextmanager
def nan_from(generator: Generator, position: int):
    """The model's rotary tables NaN at positions >= ``position`` while inside."""

    def poison(module, args, output):
        cos, sin = output
        late = (args[1] >= position)[..., None]  # position_ids [batch, n] -> [batch, n, 1]
        return cos.masked_fill(late, float("nan")), sin.masked_fill(late, float("nan"))

    handle = generator.layerwise.rotary_emb.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def nan_after(generator: Generator, token: int):
    """The embedding of ``token`` NaN while inside (the head is untied: its logit stays)."""
    weight = generator.layerwise.base.embed_tokens.weight
    row = weight[token].clone()
    with torch.no_grad():
        weight[token] = float("nan")
    try:
        yield
    finally:
        with torch.no_grad():
            weight[token] = row


def config(strategy: str, sample: bool = False, **overrides) -> GenerationConfig:
    settings = dict(max_steps=MAX_STEPS, sample=sample, generation_strategy=strategy)
    if strategy != "autoregressive":
        settings.update(exit_layer=1, num_speculations=3)
    elif "num_speculations" in overrides:
        del overrides["num_speculations"]
    return GenerationConfig(**{**settings, **overrides})


def test_the_helpers_flag_nan_infinity_and_all_minus_infinity() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [float("inf"), 0.0], [-1e30, 0.0]])
    logits = torch.cat([logits, torch.tensor([[float("-inf"), float("-inf")]])])
    assert non_finite(logits).tolist() == [False, True, True, False, True]


def test_plain_decoding_keeps_the_tokens_chosen_from_finite_logits(generator, caplog) -> None:
    clean = generator.generate_batch(PROMPTS, config("autoregressive"))
    with nan_from(generator, POISON), caplog.at_level(logging.WARNING):
        poisoned = generator.generate_batch(PROMPTS, config("autoregressive"))
    for prompt, before, after in zip(PROMPTS, clean, poisoned, strict=True):
        assert after.token_ids == before.token_ids[: POISON - len(prompt) + 1]
        assert after.stop_reason == "non_finite_logits"
    assert caplog.text.count("logits became NaN or infinite") == 1
    assert "2 of 2 generations" in caplog.text


@pytest.mark.parametrize("strategy", ["self_speculative", "tree", "adaptive"])
@pytest.mark.parametrize("compile", [False, True])
def test_speculative_decoding_stops_where_verification_meets_them(
    generator, strategy: str, compile: bool, monkeypatch
) -> None:
    """Every kept token is plain decoding's (verified from finite logits); a row stops at
    or before the poisoned token's successor, never past it (a rejected draft of it leaves
    NaN in a masked cache column, which attention still reads: 0 x NaN). The next
    generation is clean: the compiled passes keep their cache buffers across generations."""
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    clean = generator.generate_batch(PROMPTS, config("autoregressive"))
    poison = clean[0].token_ids[2]  # both rows make it (row 1 later)
    assert poison not in clean[0].token_ids[:2] + PROMPTS[0] + PROMPTS[1]
    assert poison in clean[1].token_ids
    with nan_after(generator, poison):
        poisoned = generator.generate_batch(PROMPTS, config(strategy, compile=compile))
    for before, after in zip(clean, poisoned, strict=True):
        assert after.token_ids == before.token_ids[: len(after.token_ids)]
        assert after.stop_reason == "non_finite_logits"
        assert len(after.token_ids) <= before.token_ids.index(poison) + 1
    assert poisoned[0].token_ids  # the first token comes from the (finite) prompt
    again = generator.generate_batch(PROMPTS, config(strategy, compile=compile))
    assert [result.token_ids for result in again] == [result.token_ids for result in clean]


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative", "adaptive"])
def test_sampling_does_not_fail_on_them(generator, strategy: str) -> None:
    """Drawing from NaN probabilities raises in torch; the row stops instead."""
    random = torch.Generator().manual_seed(0)
    with nan_from(generator, POISON):
        results = generator.generate_batch(PROMPTS, config(strategy, sample=True), generator=random)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.stop_reason == "non_finite_logits"
        assert 0 < len(result.token_ids) <= POISON - len(prompt) + 1
        if strategy == "autoregressive":
            assert len(result.token_ids) == POISON - len(prompt) + 1


def test_a_row_that_ends_before_them_is_not_affected(generator) -> None:
    limited = config("self_speculative", max_steps=3)
    with nan_from(generator, POISON):
        results = generator.generate_batch(PROMPTS, limited)
    assert [result.stop_reason for result in results] == ["max_steps", "max_steps"]
    assert [result.token_ids for result in results] == [
        result.token_ids for result in generator.generate_batch(PROMPTS, limited)
    ]


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_row_that_stops_on_them_leaves_no_trace_for_the_rows_that_go_on(
    generator, strategy: str
) -> None:
    """The long prompt reaches the poisoned positions and leaves the batch; the short one
    never does and decodes as it does alone, although its row moves into the buffers the
    stopped row filled with NaN (0 x NaN in attention, were they left there)."""
    long, short = list(range(20, 28)), [3, 4]
    # The short row's positions (drafts and verification's k + 1 included) stay below POISON.
    limited = config(strategy, max_steps=4, num_speculations=2)
    alone = generator.generate_batch([short], limited)[0]
    with nan_from(generator, POISON):
        stopped, healthy = generator.generate_batch([long, short], limited)
    assert stopped.stop_reason == "non_finite_logits"
    assert (healthy.token_ids, healthy.stop_reason) == (alone.token_ids, "max_steps")


@pytest.mark.parametrize(
    ("bad_at", "counts", "stop_at", "kept", "reason"),
    [
        (2, 4, None, 2, NON_FINITE),  # the tokens before the first bad one
        (0, 4, None, 0, NON_FINITE),
        (3, 2, None, 2, 0),  # past what the row appends this step: not its tokens
        (2, 4, 1, 2, EOS),  # past its end-of-sequence token
        (None, 4, None, 4, 0),
    ],
)
def test_a_step_keeps_the_tokens_chosen_before_them(bad_at, counts, stop_at, kept, reason):
    new_tokens = torch.tensor([[10, 11, 12, 13]])
    if stop_at is not None:
        new_tokens[0, stop_at] = 99
    flags = torch.zeros(1, 4, dtype=torch.bool)
    if bad_at is not None:
        flags[0, bad_at] = True
    kept_count, reason_code = kept_counts(
        new_tokens,
        torch.tensor([counts]),
        flags,
        torch.tensor([99]),
        torch.tensor([100]),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
    )
    assert (kept_count.item(), reason_code.item()) == (kept, reason)


def test_a_prompt_whose_own_logits_are_not_finite_is_named(generator) -> None:
    """In a batch, which prompt (it fails the batch before any token: nothing was decoded)."""
    from self_speculation.errors import UnsupportedModelError

    with nan_after(generator, 55):
        with pytest.raises(UnsupportedModelError, match=r"logits for prompts\[1\]"):
            generator.generate_batch([[100, 101, 102], [3, 55, 4]], config("autoregressive"))
        with pytest.raises(UnsupportedModelError, match="logits for the prompt "):
            generator.generate([3, 55, 4], config("self_speculative"))
