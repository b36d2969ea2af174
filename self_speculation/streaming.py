"""Streamers: how generated text reaches a user. The core never prints; it calls these."""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from transformers import PreTrainedTokenizerBase

from self_speculation.errors import ArgumentTypeError, ConfigError

GREEN, RED, RESET = "\033[32m", "\033[9;31m", "\033[0m"
CONTEXT_TOKENS = 4  # tokens before a continuation that it is decoded after
# A streamer decodes the tokens since its last settled point at each step; it settles after
# a written line or this many tokens, so that a step costs no more as the text grows.
SETTLE_TOKENS = 64


def decode_after(
    tokenizer: PreTrainedTokenizerBase,
    context: Sequence[int],
    tokens: Sequence[int],
    skip_special_tokens: bool = True,
) -> str:
    """The text ``tokens`` add after ``context`` (the tokens before them; the last
    ``CONTEXT_TOKENS`` are used), special tokens skipped (or written out).

    Decoded together with the context, whose own text is then removed: a tokenizer may
    decode a text's first token otherwise than the same token inside a text
    (SentencePiece Llama tokenizers, Llama 2 and CodeLlama, drop its leading space:
    "▁▁▁return" alone is "  return", after a newline "   return").
    """
    tokens = list(tokens)
    context = list(context)[-CONTEXT_TOKENS:]
    if context:
        head = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
        whole = tokenizer.decode(context + tokens, skip_special_tokens=skip_special_tokens)
        if whole.startswith(head):  # not where the context ends inside a character
            return whole[len(head) :]
    return tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that decode to no text with ``skip_special_tokens``: the special tokens and the
    added tokens marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(getattr(tokenizer, "all_special_ids", ())) | frozenset(
        token for token, entry in added.items() if getattr(entry, "special", False)
    )


class StreamerName(str, enum.Enum):
    NONE = "none"
    STANDARD = "standard"
    SPECULATIVE = "speculative"


class Streamer:
    """Receives tokens as they are decided. The base class ignores everything."""

    # Whether on_step needs the tokens (they cost a device-to-host copy every step).
    wants_tokens = False

    def __init_subclass__(cls, **kwargs) -> None:
        # A subclass that overrides on_step wants its calls unless it says otherwise.
        super().__init_subclass__(**kwargs)
        if "on_step" in vars(cls) and "wants_tokens" not in vars(cls):
            cls.wants_tokens = True

    def on_start(self, prompt_text: str) -> None:
        """Called once before the first token with the text the generated tokens begin with
        that is the prompt's (token healing backs a prompt up over its last whitespace
        token, and the first generated token repeats it); "" without healing."""

    def on_prompt(self, prompt_ids: list[int]) -> None:
        """Called once before ``on_start`` with the prompt's token ids (after token
        healing), which the generated text follows."""

    def on_step(self, new_tokens: list[int], draft_tokens: list[int], accepted_count: int) -> None:
        """Called with the tokens kept and the drafts proposed: once for the first token
        (the prompt's forward: no drafts), then once per decoding step
        (``GenerationResult.num_steps`` of them)."""

    def on_end(self) -> None:
        """Called once when generation stops."""


class TextStreamer(Streamer):
    """Writes the generated text as it grows: the tokens since the last settled point are
    decoded together after the tokens before them (``decode_after``), so that multi-token
    characters and merges come out right. The text settles (its tokens join the context)
    after each written line, or every ``SETTLE_TOKENS`` tokens: decoding everything each
    step made a step's cost grow with the text (1.3 ms per token after 3,600 tokens).

    Args:
        tokenizer: decodes token ids.
        stream: where to write (stdout by default).
    """

    wants_tokens = True

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stream: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.stream = stream or sys.stdout
        self.tokens: list[int] = []  # since the last settled point
        self.printed = 0  # characters of their text written
        self.prompt_text = ""  # the healed end of the prompt, until the text has passed it
        self.context: list[int] = []  # the tokens before them (the last CONTEXT_TOKENS)

    def on_prompt(self, prompt_ids: list[int]) -> None:
        self.context = list(prompt_ids[-CONTEXT_TOKENS:])

    def on_start(self, prompt_text: str) -> None:
        self.tokens, self.printed, self.prompt_text = [], 0, prompt_text

    def _write_new_text(self, colour: str = "", last: bool = False) -> None:
        raw = decode_after(self.tokenizer, self.context, self.tokens)
        text = raw.removeprefix(self.prompt_text)
        whole = not text.endswith("\ufffd")
        if not last:  # an incomplete multi-byte character at the end: wait for the rest
            text = text.rstrip("\ufffd")
        fresh = text[self.printed :]
        if fresh:
            self.stream.write(f"{colour}{fresh}{RESET}" if colour else fresh)
            self.stream.flush()
        # Never back: a byte-fallback tokenizer (Llama 2, CodeLlama, Mistral) decodes a run
        # of byte tokens ending inside a character as one replacement character per byte,
        # so characters written before come back only with the rest of the last one (they
        # were written twice).
        self.printed = max(self.printed, len(text))
        past_prompt = len(raw) > len(self.prompt_text)
        if whole and past_prompt and (text.endswith("\n") or len(self.tokens) >= SETTLE_TOKENS):
            self.context = (self.context + self.tokens)[-CONTEXT_TOKENS:]
            self.tokens, self.printed, self.prompt_text = [], 0, ""

    def on_step(self, new_tokens: list[int], draft_tokens: list[int], accepted_count: int) -> None:
        self.tokens.extend(new_tokens)
        self._write_new_text()

    def on_end(self) -> None:
        # What was held back for a character that never completed is the answer's too.
        self._write_new_text(last=True)
        self.stream.write("\n")
        self.stream.flush()


def colours_wanted(stream: TextIO) -> bool:
    """Whether ANSI colours suit ``stream``: a terminal, unless ``NO_COLOR`` is set;
    anything else only with ``FORCE_COLOR`` (the conventions of no-color.org and
    force-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class SpeculativeStreamer(TextStreamer):
    """Shows each step's accepted drafts in green, rejected drafts struck through in red,
    then the full model's token in the default colour.

    Args:
        tokenizer: decodes token ids.
        stream: where to write (stdout by default).
        colour: whether to colour; None: where ``colours_wanted(stream)``. Without colours
            it writes the generated text only, as ``TextStreamer`` does (rejected drafts
            written into a file would read as the answer's).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stream: TextIO | None = None,
        colour: bool | None = None,
    ) -> None:
        super().__init__(tokenizer, stream)
        self.colour = colours_wanted(self.stream) if colour is None else colour

    def on_step(self, new_tokens: list[int], draft_tokens: list[int], accepted_count: int) -> None:
        if not self.colour:
            super().on_step(new_tokens, draft_tokens, accepted_count)
            return
        kept_drafts = new_tokens[:accepted_count]
        self.tokens.extend(kept_drafts)
        self._write_new_text(GREEN)
        rejected = draft_tokens[accepted_count:]
        if rejected:
            before = self.context + self.tokens[-CONTEXT_TOKENS:]
            text = decode_after(self.tokenizer, before, rejected)
            self.stream.write(f"{RED}{text}{RESET}")
        self.tokens.extend(new_tokens[accepted_count:])
        self._write_new_text()


def build_streamer(
    name: StreamerName | str, tokenizer: PreTrainedTokenizerBase, stream: TextIO | None = None
) -> Streamer:
    """The streamer registered under ``name``, writing to ``stream`` (stdout by default).

    Raises:
        ConfigError: an unknown name (a TypeError too when it is not a str).
    """
    kinds = {
        StreamerName.NONE: Streamer,
        StreamerName.STANDARD: TextStreamer,
        StreamerName.SPECULATIVE: SpeculativeStreamer,
    }
    valid = ", ".join(kind.value for kind in StreamerName)
    if not isinstance(name, str):
        raise ArgumentTypeError(f"streamer name must be one of {valid}, got {type(name).__name__}")
    try:
        kind = kinds[StreamerName(name)]
    except ValueError:
        raise ConfigError(f"unknown streamer '{name}' (choose from {valid})") from None
    return kind() if kind is Streamer else kind(tokenizer, stream)
