"""Configuration checks, recommendations, limits, results and streamers."""

from __future__ import annotations

import io

import pytest
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import (
    ConfigError,
    GenerationConfig,
    Generator,
    HuggingfaceLlamaGenerator,
    SpeculativeStreamer,
    TextStreamer,
    load_model_and_tokenizer,
)
from self_speculation.errors import ModelLoadError


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(make_tiny_model("llama_mha_untied"), make_tiny_tokenizer())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(max_steps=0), "max_steps"),
        (dict(exit_layer=0), "exit_layer"),
        (dict(num_speculations=0), "num_speculations"),
        (dict(sample=True, temperature=0.0), "temperature"),
        (dict(sample=True, top_p=1.5), "top_p"),
        (dict(sample=True, top_k=-2), "top_k"),
        (dict(generation_strategy="beam"), "generation_strategy"),
        (dict(stop_words=[""]), "stop_words"),
    ],
)
def test_bad_settings_are_rejected_with_a_message(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**settings)


def test_greedy_ignores_sampling_settings() -> None:
    GenerationConfig(sample=False, temperature=0.0)


def test_exit_layer_beyond_the_model_is_rejected(generator: Generator) -> None:
    config = GenerationConfig(
        generation_strategy="self_speculative", exit_layer=5, num_speculations=2
    )
    with pytest.raises(ConfigError, match=r"\[1, 4\]"):
        generator.generate("def", config)


def test_self_speculation_without_settings_or_recommendation_is_rejected(
    generator: Generator,
) -> None:
    with pytest.raises(ConfigError, match="exit_layer"):
        generator.generate("def", GenerationConfig(generation_strategy="self_speculative"))


def test_recommended_settings_fill_in_missing_ones(tiny_recommending_model_dir) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_recommending_model_dir), device="cpu")
    generator = Generator(model, tokenizer)
    result = generator.generate(
        "def", GenerationConfig(generation_strategy="self_speculative", sample=False, max_steps=8)
    )
    assert (result.exit_layer, result.num_speculations) == (2, 3)
    explicit = generator.generate(
        "def",
        GenerationConfig(
            generation_strategy="self_speculative", sample=False, max_steps=8, exit_layer=1
        ),
    )
    assert (explicit.exit_layer, explicit.num_speculations) == (1, 3)


def test_empty_and_overlong_prompts_are_rejected(generator: Generator) -> None:
    with pytest.raises(ConfigError, match="empty"):
        generator.generate("", GenerationConfig(sample=False))
    with pytest.raises(ConfigError, match="context"):
        generator.generate([5] * 256, GenerationConfig(sample=False))


def test_generation_stops_at_the_context_limit(generator: Generator) -> None:
    result = generator.generate([5] * 250, GenerationConfig(sample=False, max_steps=20))
    assert len(result.token_ids) == 6 and result.stop_reason == "context_length"


def test_result_statistics_are_consistent(generator: Generator) -> None:
    config = GenerationConfig(
        sample=False,
        max_steps=20,
        generation_strategy="self_speculative",
        exit_layer=4,
        num_speculations=3,
    )
    result = generator.generate("def add", config)
    metrics = result.metrics()
    assert metrics["num_generated_tokens"] == 20
    assert metrics["num_accepted"] == metrics["num_drafted"]  # exit at the last layer
    assert metrics["tokens_per_step"] == pytest.approx(19 / result.num_steps)
    assert metrics["tokens_per_second"] == pytest.approx(20 / result.total_time)
    assert result.text == generator.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert HuggingfaceLlamaGenerator is Generator


def test_streamers_write_exactly_the_generated_text(generator: Generator) -> None:
    config = GenerationConfig(
        sample=False,
        max_steps=20,
        generation_strategy="self_speculative",
        exit_layer=2,
        num_speculations=3,
    )
    plain, coloured = io.StringIO(), io.StringIO()
    result = generator.generate(
        "def add", config, streamer=TextStreamer(generator.tokenizer, plain)
    )
    generator.generate(
        "def add", config, streamer=SpeculativeStreamer(generator.tokenizer, coloured, colour=True)
    )
    assert plain.getvalue() == result.text + "\n"
    assert "\033[32m" in coloured.getvalue() or "\033[9;31m" in coloured.getvalue()


def test_the_speculative_streamer_colours_terminals_only(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a file or a pipe, rejected drafts would read as the answer's text: there it
    writes the plain text, unless FORCE_COLOR asks for colours; NO_COLOR turns them off on
    a terminal too."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    config = GenerationConfig(
        sample=False, max_steps=20, generation_strategy="self_speculative", exit_layer=1,
        num_speculations=4,
    )  # fmt: skip
    result = generator.generate("def add", config)
    assert result.acceptance_rate < 1  # some drafts rejected: they would be written
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)

    def streamed(stream: io.StringIO) -> str:
        generator.generate(
            "def add", config, streamer=SpeculativeStreamer(generator.tokenizer, stream)
        )
        return stream.getvalue()

    assert streamed(io.StringIO()) == result.text + "\n"
    assert "\033[9;31m" in streamed(Terminal())
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert "\033[9;31m" in streamed(io.StringIO())
    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setenv("NO_COLOR", "1")
    assert streamed(Terminal()) == result.text + "\n"


def test_streamed_text_ending_in_an_unfinished_character_is_written_whole() -> None:
    """A generation that stops inside a multi-byte character (its last byte token never
    came) lost the step's text from the stream: everything up to the character is written
    as it comes, and the rest (a replacement character, as in result.text) at the end."""
    from pathlib import Path

    from transformers import AutoTokenizer

    shipped = Path(__file__).resolve().parent.parent / "models" / "layerskip-stdlib"
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    ids = tokenizer(" return total  # done \N{PARTY POPPER}", add_special_tokens=False)[
        "input_ids"
    ][:-1]  # the emoji's last byte token is missing
    text = tokenizer.decode(ids)
    assert text.endswith("\ufffd")
    for streamer_for in (
        lambda stream: TextStreamer(tokenizer, stream),
        lambda stream: SpeculativeStreamer(tokenizer, stream, colour=True),
    ):
        stream = io.StringIO()
        streamer = streamer_for(stream)
        streamer.on_start("")
        streamer.on_step(ids[:2], [], 0)
        streamer.on_step(ids[2:], [], 0)
        assert stream.getvalue().replace("\033[0m", "").endswith("# done ")  # not held back
        streamer.on_end()
        assert stream.getvalue().replace("\033[0m", "") == text + "\n"


def test_missing_local_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model_and_tokenizer(str(tmp_path / "nope"), device="cpu")
