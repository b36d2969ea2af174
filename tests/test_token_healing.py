"""Token healing: a prompt ending in a token that longer tokens extend (HumanEval's
trailing newline) is backed up over it, and the first generated token must re-create it."""

from __future__ import annotations

import io

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, StopChecker, TextStreamer

PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer())


def test_healing_backs_up_over_the_trailing_newline_and_constrains_the_first_token(
    generator: Generator,
) -> None:
    ids = generator.encode(PROMPT)
    tail = generator.tokenizer.decode([ids[-1]])
    assert tail.endswith("\n")
    healed, removed, allowed = generator._heal([ids])
    assert healed == [ids[:-1]] and removed == [tail]
    texts = generator._token_texts()
    allowed_ids = allowed[0].nonzero().flatten().tolist()
    assert ids[-1] in allowed_ids and len(allowed_ids) >= 2  # a longer token extends it
    assert all(texts[token].startswith(tail) for token in allowed_ids)


@pytest.mark.parametrize("sample", [False, True])
def test_healed_generation_continues_the_original_prompt_in_both_strategies(
    generator: Generator, sample: bool
) -> None:
    settings = dict(max_steps=12, sample=sample, token_healing=True)
    results = [
        generator.generate(
            PROMPT, GenerationConfig(**settings), generator=torch.Generator().manual_seed(0)
        ),
        generator.generate(
            PROMPT,
            GenerationConfig(
                **settings, generation_strategy="self_speculative", exit_layer=2, num_speculations=3
            ),
            generator=torch.Generator().manual_seed(0),
        ),
    ]
    tail = generator.tokenizer.decode([generator.encode(PROMPT)[-1]])
    for result in results:
        full = generator.tokenizer.decode(result.token_ids)
        assert full.startswith(tail)  # the first token re-created the removed newline
        assert result.text == full[len(tail) :]  # the text is what follows the prompt
    if not sample:
        assert results[0].token_ids == results[1].token_ids


def test_nothing_to_heal_leaves_the_prompt_alone(generator: Generator) -> None:
    ids = generator.encode("The quick brown fox")
    healed, removed, allowed = generator._heal([ids, ids[:1]])
    texts = generator._token_texts()
    tail = texts[ids[-1]]
    extending = [t for t, text in enumerate(texts) if text.startswith(tail)]
    if len(extending) < 2:
        assert healed[0] == ids and removed[0] == "" and bool(allowed[0].all())
    assert healed[1] == ids[:1] and removed[1] == "" and bool(allowed[1].all())  # one token


def test_stop_words_and_streamers_see_only_what_follows_the_prompt(
    generator: Generator,
) -> None:
    """The first healed token repeats the prompt's backed-up newline: that newline is the
    prompt's, so it neither completes a stop word nor reaches a streamer."""
    tail = generator.tokenizer.decode([generator.encode(PROMPT)[-1]])
    stream = io.StringIO()
    result = generator.generate(
        PROMPT,
        GenerationConfig(max_steps=12, sample=False, stop_words=[tail], token_healing=True),
        streamer=TextStreamer(generator.tokenizer, stream),
    )
    assert result.stop_reason != "stop_word" or tail in result.text
    assert stream.getvalue() == result.text + "\n"  # on_end ends the line
    checker = StopChecker(generator.tokenizer, frozenset(), [tail])
    first = generator.encode(tail + "    ")[-2:]  # the newline, then text after it
    assert checker.reason(first) == "stop_word"
    assert checker.reason(first, prompt_text=tail) is None


def test_stop_words_of_many_tokens_per_character_are_found() -> None:
    """Byte-level tokens: each of these characters is several tokens."""
    tokenizer = make_tiny_tokenizer()
    for word in ("🦀" * 5, "😀" * 10, "ǅ" * 10):
        ids = tokenizer("x = " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) > len(word) + 8  # more tokens than characters
        assert StopChecker(tokenizer, frozenset(), [word]).reason(ids) == "stop_word"


@pytest.mark.parametrize("sample", [False, True])
def test_processors_that_ban_every_healed_first_token_are_one_error(sample: bool) -> None:
    """The checkpoint suppresses every token that may re-create the healed newline: a
    ConfigError naming the way out, not a silent BOS (greedy) or a multinomial failure."""
    from self_speculation import ConfigError

    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    generator = Generator(model, make_tiny_tokenizer())
    texts = generator._token_texts()
    newline = texts[generator.encode(PROMPT)[-1]]
    model.generation_config.suppress_tokens = [
        token for token, text in enumerate(texts) if text.startswith(newline)
    ]
    config = GenerationConfig(max_steps=4, sample=sample, token_healing=True)
    with pytest.raises(ConfigError, match="token_healing=False"):
        generator.generate(PROMPT, config)
    config = GenerationConfig(max_steps=4, sample=sample, token_healing=False)
    assert generator.generate(PROMPT, config).token_ids


def test_a_token_added_to_the_tokenizer_afterwards_may_heal_the_prompt() -> None:
    """The vocabulary's texts follow the tokenizer: a token added after the first healed
    generation (into a spare row of the model's vocabulary) is a first token healing
    allows, as for a new Generator; they were computed once."""
    generator = Generator(
        make_tiny_model("llama_gqa_tied", dtype=torch.float32), make_tiny_tokenizer()
    )
    ids = generator.encode(PROMPT)
    _, removed, before = generator._heal([ids])
    assert removed[0].endswith("\n")
    added = len(generator.tokenizer)
    assert added < generator.layerwise.embed_tokens.weight.shape[0]  # a spare row
    generator.tokenizer.add_tokens([removed[0] + "    return"])
    assert not before[0, added]
    _, _, after = generator._heal([ids])
    fresh = Generator(generator.model, generator.tokenizer)._heal([ids])[2]
    assert after[0, added] and torch.equal(after, fresh)
