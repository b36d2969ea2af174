"""A checkpoint's generation_config ``token_healing: true`` changes what transformers'
``generate`` (given the tokenizer, as pipelines give it) decodes; the engine heals only when
its own GenerationConfig asks. Like every other checkpoint setting it does not apply, it
must be named in the load warning, not ignored silently."""

from __future__ import annotations

import logging

import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation.model_support import unapplied_generation_settings


def test_checkpoint_token_healing_is_named_as_unapplied(caplog) -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    assert unapplied_generation_settings(model) == []
    model.generation_config.token_healing = True
    assert unapplied_generation_settings(model) == ["token_healing=True"]
    with caplog.at_level(logging.WARNING):
        generator = Generator(model, make_tiny_tokenizer())
    assert "token_healing=True" in caplog.text
    # The engine itself still decodes without healing unless asked to.
    config = GenerationConfig(max_steps=3, sample=False)
    assert len(generator.generate([5, 6, 201], config).token_ids) == 3


def test_checkpoint_token_healing_off_is_not_named() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.generation_config.token_healing = False
    assert unapplied_generation_settings(model) == []
