"""Prompts handed over as ids padded by the tokenizer (``tokenizer(batch, padding=True)``)
were decoded with their padding as prompt text, without a word: the engine reads every id it
is given and pads batches itself. It now warns, as transformers' generate warns of right
padding."""

from __future__ import annotations

import logging

import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator

CONFIG = GenerationConfig(sample=False, max_steps=3)


def _generator() -> Generator:
    torch.manual_seed(0)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    return Generator(model, make_tiny_tokenizer())


def test_padded_id_prompts_are_warned_about(caplog) -> None:
    generator = _generator()
    tokenizer = generator.tokenizer
    pad = tokenizer.pad_token_id
    batch = tokenizer(["def add(a, b):", "x"], padding=True)["input_ids"]
    assert batch[1][-1] == pad  # right-padded by the tokenizer
    with caplog.at_level(logging.WARNING, logger="self_speculation.generator"):
        generator.generate_batch(batch, CONFIG)
    (warning,) = [r.getMessage() for r in caplog.records if "pad token" in r.getMessage()]
    assert "1 of 2 prompts (prompts[1])" in warning and f"(id {pad})" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="self_speculation.generator"):
        generator.generate_batch([[pad, *batch[0]]], CONFIG)  # left padding too
    assert any("pad token" in r.getMessage() for r in caplog.records)


def test_unpadded_prompts_are_not_warned_about(caplog) -> None:
    generator = _generator()
    with caplog.at_level(logging.WARNING, logger="self_speculation.generator"):
        generator.generate_batch(["def add(a, b):", "x"], CONFIG)
        generator.generate(generator.encode("x = 1"), CONFIG)
    assert not any("pad token" in r.getMessage() for r in caplog.records)


def test_a_text_ending_in_the_pad_token_is_not_warned_about(caplog) -> None:
    """A text whose writer ended it with the pad token's text (Qwen's pad token is its
    <|endoftext|>, which documents end with) is what the writer meant, not padding."""
    generator = _generator()
    pad_text = generator.tokenizer.pad_token
    text = f"x = 1{pad_text}"
    assert generator.encode(text)[-1] == generator.tokenizer.pad_token_id
    with caplog.at_level(logging.WARNING, logger="self_speculation.generator"):
        generator.generate_batch([text, "y"], CONFIG)
    assert not any("pad token" in r.getMessage() for r in caplog.records)
