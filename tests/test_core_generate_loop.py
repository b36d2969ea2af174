"""Mutation-testing survivors of ``Generator``'s generate loop: stop words met inside a
step, limits at the context's end, token healing of a one-token prompt."""

from __future__ import annotations

import io

from test_decoding_invariants import with_finished_rows_kept
from test_equivalence import BATCH_PROMPTS, NUM_LAYERS, generator_for, greedy, speculative

from self_speculation import TextStreamer


def _stop_word(generator, prompt: list[int]) -> str:
    free_run = generator.generate(prompt, greedy(40))
    return free_run.text[len(free_run.text) // 2 :][:3]


def test_a_streamer_gets_no_token_after_a_stop_word_met_inside_a_step() -> None:
    """Full-model drafts (all accepted, up to 9 tokens a step): the stop word completes in
    the middle of a step, whose later tokens are dropped from the stream too."""
    generator = generator_for("llama_mha_untied")
    stop_word = _stop_word(generator, [5, 60, 7])
    stream = io.StringIO()
    result = generator.generate(
        [5, 60, 7],
        speculative(NUM_LAYERS, 8, max_steps=40, stop_words=[stop_word]),
        streamer=TextStreamer(generator.tokenizer, stream),
    )
    assert result.stop_reason == "stop_word"
    assert stream.getvalue() == result.text + "\n"


def test_rows_kept_after_a_stop_word_count_no_more_steps() -> None:
    """A row that a stop word ends stays in the batch (shed_finished_rows off): its
    statistics are those of its single run."""
    generator = generator_for("llama_mha_untied")
    stop_word = _stop_word(generator, BATCH_PROMPTS[1])
    config = speculative(2, 3, max_steps=30, stop_words=[stop_word])
    singles = [generator.generate(prompt, config) for prompt in BATCH_PROMPTS]
    assert singles[1].stop_reason == "stop_word"
    kept = with_finished_rows_kept(generator, config)
    assert [r.token_ids for r in kept] == [s.token_ids for s in singles]
    assert [(r.num_steps, r.num_drafted, r.num_accepted) for r in kept] == [
        (s.num_steps, s.num_drafted, s.num_accepted) for s in singles
    ]


def test_max_steps_that_end_exactly_at_the_context_limit_stop_for_max_steps() -> None:
    generator = generator_for("llama_mha_untied")
    context = generator.layerwise.context_length
    prompt = [5] * (context - 6)
    result = generator.generate(prompt, greedy(6))
    assert len(result.token_ids) == 6 and result.stop_reason == "max_steps"
    result = generator.generate(prompt, greedy(7))
    assert len(result.token_ids) == 6 and result.stop_reason == "context_length"


def test_a_prompt_of_one_whitespace_token_is_not_healed_away() -> None:
    """Backing up over a prompt's only token would leave nothing to condition on."""
    generator = generator_for("llama_mha_untied")
    newline = generator.encode("\n")
    assert len(newline) == 1
    healed = generator.generate(newline, greedy(6, token_healing=True))
    assert healed.token_ids == generator.generate(newline, greedy(6)).token_ids
    assert healed.num_prompt_tokens == 1


def test_a_row_kept_after_it_finishes_does_not_lengthen_the_others_last_drafts() -> None:
    """Near their limit, running rows draft no more than their room allows; a finished row
    that stays in the batch (shed_finished_rows off), with room left it will never use,
    must not raise that: the statistics equal those of the batch it left."""
    generator = generator_for("llama_mha_untied")
    free_run = generator.generate(BATCH_PROMPTS[1], greedy(20)).token_ids
    config = speculative(1, 6, max_steps=20, stop_token_ids=[free_run[1]])  # row 1: 2 tokens
    shed = generator.generate_batch(BATCH_PROMPTS, config)
    kept = with_finished_rows_kept(generator, config)
    assert shed[1].stop_reason == "eos" and len(shed[1].token_ids) == 2
    assert [(r.token_ids, r.num_steps, r.num_drafted, r.num_accepted) for r in kept] == [
        (r.token_ids, r.num_steps, r.num_drafted, r.num_accepted) for r in shed
    ]


def test_a_prompt_ending_in_a_word_that_longer_tokens_extend_is_not_healed() -> None:
    """Only a trailing whitespace token is a boundary worth healing: a word or punctuation
    token is left alone, even where longer tokens begin with its text."""
    generator = generator_for("llama_mha_untied")
    texts = generator._token_texts()
    word = next(
        token
        for token, text in enumerate(texts)
        if text.strip() and sum(other.startswith(text) for other in texts) >= 2
    )
    healed, removed, allowed = generator._heal([[5, 60, word]])
    assert healed == [[5, 60, word]] and removed == [""] and bool(allowed.all())


def test_the_models_end_token_stops_generation_without_stop_token_ids() -> None:
    """The model's generation config's eos_token_id, set after the Generator was made, ends
    a generation as the config's stop_token_ids do."""
    generator = generator_for("llama_mha_untied")
    free_run = generator.generate([5, 60, 7], greedy(20)).token_ids
    end = free_run[5]
    generation_config = generator.model.generation_config
    before = generation_config.eos_token_id
    generation_config.eos_token_id = end
    try:
        for config in (greedy(20), speculative(2, 3, max_steps=20)):
            result = generator.generate([5, 60, 7], config)
            assert result.token_ids == free_run[: free_run.index(end) + 1]
            assert result.stop_reason == "eos"
    finally:
        generation_config.eos_token_id = before
