"""Greedy self-speculative decoding is token-for-token identical to autoregressive decoding."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import FAMILIES, make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation.passes import ForwardPasses
from self_speculation.strategies import SelfSpeculativeGenerationStrategy

NUM_LAYERS = 4
PROMPTS = {"one_token": [5], "several_tokens": [5, 60, 7, 200, 31]}


@functools.cache
def generator_for(family: str) -> Generator:
    return Generator(make_tiny_model(family), make_tiny_tokenizer())


def greedy(max_steps: int = 24, **settings) -> GenerationConfig:
    return GenerationConfig(max_steps=max_steps, sample=False, **settings)


def speculative(exit_layer: int, num_speculations: int, **settings) -> GenerationConfig:
    return greedy(
        generation_strategy="self_speculative",
        exit_layer=exit_layer,
        num_speculations=num_speculations,
        **settings,
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_name", PROMPTS)
def test_greedy_self_speculation_matches_autoregressive(family: str, prompt_name: str) -> None:
    generator = generator_for(family)
    prompt = PROMPTS[prompt_name]
    reference = generator.generate(prompt, greedy()).token_ids
    assert len(reference) == 24
    for exit_layer in range(1, NUM_LAYERS + 1):
        for num_speculations in (1, 2, 3, 5, 8):
            result = generator.generate(prompt, speculative(exit_layer, num_speculations))
            assert result.token_ids == reference, (exit_layer, num_speculations)


@pytest.mark.parametrize("max_steps", [1, 2, 3, 4])
def test_max_steps_smaller_than_num_speculations_is_exact(max_steps: int) -> None:
    generator = generator_for("llama_mha_untied")
    reference = generator.generate([5, 6], greedy(max_steps)).token_ids
    for exit_layer in (1, 2, 4):
        result = generator.generate([5, 6], speculative(exit_layer, 8, max_steps=max_steps))
        assert result.token_ids == reference
        assert len(result.token_ids) == max_steps
        assert result.stop_reason == "max_steps"


@pytest.mark.parametrize("sample", [False, True])
def test_eager_verification_covers_only_the_drafts_made(sample: bool, monkeypatch) -> None:
    """A k far above the tokens left (k = 200 for 8 tokens) verifies the positions drafted,
    not k + 1 every step (15x as long, the same tokens); greedy tokens stay autoregressive
    decoding's."""
    generator = generator_for("llama_mha_untied")
    widths = []
    verify = ForwardPasses.verify

    def recording(self, last_tokens, exit_states, *args):
        widths.append(exit_states.shape[1])
        return verify(self, last_tokens, exit_states, *args)

    monkeypatch.setattr(ForwardPasses, "verify", recording)

    def run(k: int) -> list[int]:
        config = GenerationConfig(
            max_steps=8,
            sample=sample,
            generation_strategy="self_speculative",
            exit_layer=2,
            num_speculations=k,
        )
        return generator.generate([5, 6], config, generator=torch.Generator().manual_seed(1))

    huge = run(200).token_ids
    assert widths and max(widths) <= 8 and len(huge) == 8
    if not sample:
        assert huge == run(8).token_ids == generator.generate([5, 6], greedy(8)).token_ids


def test_exit_at_last_layer_accepts_every_draft() -> None:
    generator = generator_for("llama_mha_untied")
    reference = generator.generate([5, 6], greedy(40)).token_ids
    result = generator.generate([5, 6], speculative(NUM_LAYERS, 5, max_steps=40))
    assert result.token_ids == reference
    assert result.num_drafted > 0 and result.acceptance_rate == 1.0
    # 39 tokens after the prompt's pass, 6 per step: 7 steps.
    assert result.num_steps == 7


@pytest.mark.parametrize("family", ["llama_mha_untied", "mistral"])
def test_random_early_exit_accepts_almost_nothing_yet_output_is_identical(family: str) -> None:
    generator = generator_for(family)
    reference = generator.generate([5, 6, 7], greedy(60)).token_ids
    result = generator.generate([5, 6, 7], speculative(1, 3, max_steps=60))
    assert result.token_ids == reference
    assert result.acceptance_rate < 0.15


@pytest.mark.parametrize("family", ["llama_mha_untied", "qwen2"])
def test_eos_produced_inside_a_draft_stops_exactly(family: str) -> None:
    generator = generator_for(family)
    free_run = generator.generate([5, 60, 7], greedy(40)).token_ids
    eos = free_run[9]  # becomes an end-of-sequence token for this run
    reference = generator.generate([5, 60, 7], greedy(40, stop_token_ids=[eos]))
    assert reference.stop_reason == "eos" and reference.token_ids[-1] == eos
    assert reference.token_ids == free_run[: free_run.index(eos) + 1]
    for exit_layer in (1, 3, 4):
        for num_speculations in (2, 5, 8):
            result = generator.generate(
                [5, 60, 7], speculative(exit_layer, num_speculations, stop_token_ids=[eos])
            )
            assert result.token_ids == reference.token_ids
            assert result.stop_reason == "eos"


def test_stop_words_across_draft_boundaries_stop_exactly() -> None:
    generator = generator_for("llama_mha_untied")
    tokenizer = generator.tokenizer
    free_run = generator.generate([5, 60, 7], greedy(40))
    stop_word = free_run.text[len(free_run.text) // 2 :][:3]
    assert stop_word
    reference = generator.generate([5, 60, 7], greedy(40, stop_words=[stop_word]))
    assert reference.stop_reason == "stop_word"
    assert stop_word in reference.text
    assert stop_word not in tokenizer.decode(reference.token_ids[:-1], skip_special_tokens=True)
    for exit_layer in (1, 2, 4):
        for num_speculations in (3, 8):
            result = generator.generate(
                [5, 60, 7], speculative(exit_layer, num_speculations, stop_words=[stop_word])
            )
            assert result.token_ids == reference.token_ids


def test_no_repeat_ngram_sees_the_whole_sequence_in_both_strategies() -> None:
    generator = generator_for("mistral")  # its greedy output loops
    looping = generator.generate([5, 6, 7], greedy(30)).token_ids
    looping_bigrams = list(zip(looping, looping[1:]))
    assert len(looping_bigrams) > len(set(looping_bigrams))
    reference = generator.generate([5, 6, 7], greedy(30, no_repeat_ngram_size=2))
    bigrams = list(zip(reference.token_ids, reference.token_ids[1:]))
    assert len(bigrams) == len(set(bigrams))
    for exit_layer in (1, 3):
        result = generator.generate(
            [5, 6, 7], speculative(exit_layer, 4, max_steps=30, no_repeat_ngram_size=2)
        )
        assert result.token_ids == reference.token_ids


def assert_cache_equals_a_fresh_prefill(
    generator: Generator, passes: ForwardPasses, state
) -> list[int]:
    """Every layer's keys and values before each row's pending column equal those of a
    fresh pass over the row's kept tokens; returns the checked lengths, one per row."""
    checked = []
    for row in range(len(state.lengths)):
        kept = int(state.lengths[row]) - 1  # columns before the pending token
        fresh = passes.new_cache(1, state.cache.capacity)
        passes.prefill(
            state.tokens[row : row + 1, :kept],
            fresh,
            state.pad_counts[row : row + 1],
            generator.num_layers,
        )
        start = int(state.pad_counts[row])
        for layer in range(generator.num_layers):
            for ours, theirs in (
                (state.cache.keys[layer], fresh.keys[layer]),
                (state.cache.values[layer], fresh.values[layer]),
            ):
                torch.testing.assert_close(
                    ours[row, :, start:kept], theirs[0, :, start:kept], rtol=0, atol=1e-10
                )
        checked.append(kept)
    return checked


@pytest.mark.parametrize("exit_layer", [1, 2, 4])
def test_cache_before_the_pending_token_equals_a_fresh_prefill_after_every_step(
    exit_layer: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollback by moving a length: whatever rejected drafts wrote, every layer's keys and
    values before each row's pending column are those of a fresh pass over the kept tokens."""
    generator = generator_for("qwen2")
    passes = ForwardPasses(generator.layerwise)
    checked_lengths = []
    original_step = SelfSpeculativeGenerationStrategy.step

    def checked_step(self, state, num_drafts, active):
        result = original_step(self, state, num_drafts, active)
        checked_lengths.extend(assert_cache_equals_a_fresh_prefill(generator, passes, state))
        return result

    monkeypatch.setattr(SelfSpeculativeGenerationStrategy, "step", checked_step)
    single = generator.generate([5, 60, 7], speculative(exit_layer, 3, max_steps=30))
    assert single.num_steps > 3
    batch = generator.generate_batch([[5, 60, 7], [9, 8]], speculative(exit_layer, 3, max_steps=30))
    # Each step checks the rows still in the batch: finished rows leave it (eager
    # decoding shrinks it to the running rows), so every row is checked once per step of
    # its own, including the steps after the batch shrank and its padding was cut.
    assert len(checked_lengths) == single.num_steps + sum(r.num_steps for r in batch)


def test_early_exit_autoregressive_uses_only_the_first_layers() -> None:
    generator = generator_for("llama_mha_untied")
    layerwise = generator.layerwise
    prompt = torch.tensor([[5, 60, 7]])
    result = generator.generate(
        [5, 60, 7], greedy(1, generation_strategy="autoregressive", exit_layer=2)
    )
    early_logits = layerwise.logits(prompt, exit_layer=2)[0, -1]
    assert result.token_ids == [int(early_logits.argmax())]
    full = generator.generate([5, 60, 7], greedy(1))
    assert full.token_ids == [int(layerwise.logits(prompt)[0, -1].argmax())]


BATCH_PROMPTS = [[5], [5, 60, 7, 200, 31], [9, 8, 7]]


@pytest.mark.parametrize("family", ["llama_mha_untied", "qwen2_sliding", "mistral"])
def test_batched_rows_equal_their_single_runs_for_both_strategies(family: str) -> None:
    """Left-padded batches: every row's greedy output is its own one-by-one output."""
    generator = generator_for(family)
    singles = [generator.generate(prompt, greedy()).token_ids for prompt in BATCH_PROMPTS]
    batch = generator.generate_batch(BATCH_PROMPTS, greedy())
    assert [result.token_ids for result in batch] == singles
    for exit_layer in (1, 2, 4):
        for num_speculations in (2, 5):
            results = generator.generate_batch(
                BATCH_PROMPTS, speculative(exit_layer, num_speculations)
            )
            assert [result.token_ids for result in results] == singles, (
                exit_layer,
                num_speculations,
            )


def test_batched_rows_stop_on_their_own() -> None:
    generator = generator_for("llama_mha_untied")
    free_runs = [generator.generate(prompt, greedy(30)).token_ids for prompt in BATCH_PROMPTS]
    eos = free_runs[1][4]  # ends row 1 early; the other rows may or may not contain it
    settings = dict(max_steps=30, stop_token_ids=[eos])
    singles = [generator.generate(p, greedy(**settings)) for p in BATCH_PROMPTS]
    assert singles[1].stop_reason == "eos"
    for config in (greedy(**settings), speculative(2, 4, **settings)):
        results = generator.generate_batch(BATCH_PROMPTS, config)
        assert [r.token_ids for r in results] == [s.token_ids for s in singles]
        assert [r.stop_reason for r in results] == [s.stop_reason for s in singles]


def test_batched_early_exit_decoding_equals_single_runs() -> None:
    generator = generator_for("qwen2")
    config = greedy(generation_strategy="autoregressive", exit_layer=2)
    singles = [generator.generate(prompt, config).token_ids for prompt in BATCH_PROMPTS]
    assert [r.token_ids for r in generator.generate_batch(BATCH_PROMPTS, config)] == singles


def test_left_padded_sliding_window_batches_are_finite_and_exact() -> None:
    """transformers' own Gemma 2 forward gives NaN for a query whose whole sliding window
    is left padding; here a padding query sees itself, so no row of attention is empty and
    every row equals its single run."""
    generator = generator_for("gemma2_softcap_sliding")
    singles = [generator.generate(prompt, greedy()).token_ids for prompt in BATCH_PROMPTS]
    for config in (greedy(), speculative(2, 3)):
        assert [r.token_ids for r in generator.generate_batch(BATCH_PROMPTS, config)] == singles


def test_confidence_threshold_shortens_drafts_and_keeps_outputs_exact() -> None:
    generator = generator_for("llama_mha_untied")
    reference = generator.generate([5, 60, 7], greedy(40)).token_ids
    fixed = generator.generate([5, 60, 7], speculative(2, 6, max_steps=40))
    for threshold in (0.05, 0.5, 0.99):
        adaptive = generator.generate(
            [5, 60, 7], speculative(2, 6, max_steps=40, draft_confidence_threshold=threshold)
        )
        assert adaptive.token_ids == reference
    # A random model is never 99% sure: one draft per step, then verification.
    assert adaptive.num_drafted <= adaptive.num_steps < fixed.num_drafted


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_finished_rows_leave_the_batch(strategy: str) -> None:
    """Once a row stops, later steps run without it (eager: the running rows alone), and
    every row still gets its single run's tokens and stop reason."""
    generator = generator_for("llama_mha_untied")
    free_runs = [generator.generate(prompt, greedy(30)).token_ids for prompt in BATCH_PROMPTS]
    eos = free_runs[1][3]  # row 1 (the longest prompt, no padding) stops after 4 tokens
    settings = dict(max_steps=30, stop_token_ids=[eos])
    config = greedy(**settings) if strategy == "autoregressive" else speculative(2, 3, **settings)
    singles = [generator.generate(prompt, config) for prompt in BATCH_PROMPTS]
    passes = generator._passes(config)
    passes.pass_seconds = {}
    try:
        results = generator.generate_batch(BATCH_PROMPTS, config)
    finally:
        timed, passes.pass_seconds = passes.pass_seconds, None
    assert [r.token_ids for r in results] == [s.token_ids for s in singles]
    assert [r.stop_reason for r in results] == [s.stop_reason for s in singles]
    assert [r.num_steps for r in results] == [s.num_steps for s in singles]
    assert len({r.num_steps for r in results}) > 1  # the rows finished apart
    batch_sizes = {key[2] for key in timed}
    assert max(batch_sizes) == 3 and min(batch_sizes) < 3
    generator.shed_finished_rows = False  # every row to the end: one batch size throughout
    passes.pass_seconds = {}
    try:
        kept = generator.generate_batch(BATCH_PROMPTS, config)
    finally:
        generator.shed_finished_rows, timed, passes.pass_seconds = True, passes.pass_seconds, None
    assert [r.token_ids for r in kept] == [s.token_ids for s in singles]
    assert {key[2] for key in timed} == {3}
