"""Mutation-testing survivors of ``streaming``: what the streamers write and when."""

from __future__ import annotations

import io

import pytest
from test_equivalence import generator_for, speculative
from tiny_models import make_tiny_tokenizer

from self_speculation.streaming import (
    GREEN,
    RED,
    RESET,
    SpeculativeStreamer,
    Streamer,
    TextStreamer,
    colours_wanted,
)


def test_the_speculative_streamer_strikes_through_every_rejected_draft() -> None:
    """Drafts a, b, x, y with two accepted: a and b in green, then x and y (the first
    rejected draft included) struck through, then the full model's token."""
    tokenizer = make_tiny_tokenizer()
    a, b, x, y, c = (tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in "ABXYC")
    stream = io.StringIO()
    streamer = SpeculativeStreamer(tokenizer, stream, colour=True)
    streamer.on_prompt([5, 6])
    streamer.on_start("")
    streamer.on_step([a, b, c], [a, b, x, y], 2)
    assert stream.getvalue() == f"{GREEN}AB{RESET}{RED}XY{RESET}C"


def test_a_streamer_used_again_writes_each_generation_whole() -> None:
    generator = generator_for("llama_mha_untied")
    stream = io.StringIO()
    streamer = TextStreamer(generator.tokenizer, stream)
    config = speculative(2, 3, max_steps=10)
    first = generator.generate([5, 60, 7], config, streamer=streamer)
    second = generator.generate([9, 8, 7], config, streamer=streamer)
    assert stream.getvalue() == first.text + "\n" + second.text + "\n"


def test_a_streamer_overriding_on_step_may_still_decline_the_tokens() -> None:
    class Declining(Streamer):
        wants_tokens = False

        def on_step(self, new_tokens, draft_tokens, accepted_count) -> None:
            pass

    class Wanting(Streamer):
        def on_step(self, new_tokens, draft_tokens, accepted_count) -> None:
            pass

    assert Declining.wants_tokens is False and Wanting.wants_tokens is True


def test_an_empty_no_color_leaves_colours_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """no-color.org: NO_COLOR turns colours off when present and not an empty string."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("NO_COLOR", "")
    assert colours_wanted(Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not colours_wanted(Terminal())


def test_rejected_drafts_of_a_first_step_keep_their_leading_space_after_the_prompt() -> None:
    """A SentencePiece Llama tokenizer drops a text's leading space: the struck-through
    drafts of the first step are decoded after the prompt, as the accepted text is."""
    from test_text_output import llama2_tokenizer

    tokenizer, vocab = llama2_tokenizer()
    stream = io.StringIO()
    streamer = SpeculativeStreamer(tokenizer, stream, colour=True)
    streamer.on_prompt([vocab["<s>"], vocab["▁Hello"]])
    streamer.on_start("")
    streamer.on_step([vocab["▁x"]], [vocab["▁world"]], 0)
    assert stream.getvalue() == f"{RED} world{RESET} x"
