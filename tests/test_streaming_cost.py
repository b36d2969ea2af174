"""A streamer's step costs the same late in a long text as early: it decodes the tokens
since its last settled point (a written line, or SETTLE_TOKENS tokens), not the whole
text, and writes exactly what decoding the whole text writes."""

from __future__ import annotations

import io
import random

import pytest
from test_text_output import PIECES, llama2_tokenizer
from tiny_models import make_tiny_tokenizer
from transformers import AutoTokenizer

from self_speculation import DEFAULT_MODEL
from self_speculation.streaming import SETTLE_TOKENS, SpeculativeStreamer, TextStreamer


def _tokenizers() -> dict:
    llama2, vocab = llama2_tokenizer()
    return {
        "shipped (byte-level BPE)": AutoTokenizer.from_pretrained(DEFAULT_MODEL),
        "tiny": make_tiny_tokenizer(),
        "llama 2 (SentencePiece)": llama2,
    }


TEXT = (
    "def add(a, b):\n    return a + b  # naïve sum, ≥ 0 ✓ 🙂\n\n"
    "class Point:\n    x: float = 0.0\n" + "word " * 90 + "\n"
) * 12


def _ids(tokenizer, name: str) -> list[int]:
    if name.startswith("llama"):  # a handful of pieces, and characters as their bytes
        _, vocab = llama2_tokenizer()
        units = [[vocab[piece]] for piece in PIECES] + [[vocab["<0x0A>"]]]
        units += [[vocab[f"<0x{byte:02X}>"] for byte in char.encode()] for char in "é≥🙂"]
        rng = random.Random(0)
        return [token for _ in range(800) for token in rng.choice(units)]
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"]


class CountingTokenizer:
    """Passes decode calls through, counting the tokens decoded."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("name", list(_tokenizers()))
@pytest.mark.parametrize("kind", [TextStreamer, SpeculativeStreamer])
def test_a_long_stream_writes_the_whole_text_at_a_bounded_cost_per_step(name, kind) -> None:
    tokenizer = _tokenizers()[name]
    ids = _ids(tokenizer, name)
    prompt = ids[:5]
    generated = ids[5:]
    counting = CountingTokenizer(tokenizer)
    stream = io.StringIO()
    streamer = kind(counting, stream) if kind is TextStreamer else kind(counting, stream, False)
    streamer.on_prompt(prompt)
    streamer.on_start("")
    rng = random.Random(1)
    position = 0
    while position < len(generated):  # steps of 1 to 4 tokens, as self-speculation gives
        step = generated[position : position + rng.randint(1, 4)]
        streamer.on_step(step, [], len(step) - 1)
        position += len(step)
    streamer.on_end()
    whole = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    assert stream.getvalue() == whole[len(head) :] + "\n"
    # Each step decodes at most the tokens since the last settled point, twice, plus the
    # context: bounded, where decoding the whole text each step grows with it.
    assert counting.decoded < len(generated) * 2 * (SETTLE_TOKENS + 8), counting.decoded


def test_characters_before_a_split_one_are_written_once_with_byte_fallback() -> None:
    """A byte-fallback tokenizer decodes a run of byte tokens that ends inside a character
    as one replacement character per byte: the characters of the run written before came
    back with the rest of the last one, and were written twice ("🙂🙂é≥")."""
    tokenizer, vocab = llama2_tokenizer()
    stream = io.StringIO()
    streamer = TextStreamer(tokenizer, stream)
    streamer.on_prompt([vocab["<s>"], vocab["▁Hello"]])
    streamer.on_start("")
    bytes_of = [[vocab[f"<0x{byte:02X}>"] for byte in char.encode()] for char in "🙂é≥"]
    streamer.on_step([vocab["▁x"], *bytes_of[0]], [], 0)
    streamer.on_step([*bytes_of[1], *bytes_of[2][:2]], [], 0)  # ≥ cut after two bytes
    streamer.on_step(bytes_of[2][2:], [], 0)
    streamer.on_end()
    assert stream.getvalue() == " x🙂é≥\n"
