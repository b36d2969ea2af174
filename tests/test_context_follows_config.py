"""The context a Generator decodes up to follows the model's config as it is at each
generation, as the other settings it reads from the config do (``Generator.follow_model``):
a ``max_position_embeddings`` or a longrope switch point (``original_max_position_embeddings``,
which transformers' longrope tables and Phi-3's cache reset read at each call) changed after
the Generator was made ends decoding where a Generator made now ends it.

The context was read once, when the Generator was made: after a smaller context, decoding
went on to the old one (and past a new switch point, where a position's rotary tables depend
on the call); after a larger one, prompts that fit were refused, the message quoting the old
``max_position_embeddings``.
"""

from __future__ import annotations

import pytest
from tiny_models import ROPE_SWITCH, IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator

PROMPT = [5, 60, 7, 200, 31, 9, 44, 12, 90, 3]


def settings(strategy: str) -> GenerationConfig:
    extra = {} if strategy == "autoregressive" else {"exit_layer": 2, "num_speculations": 3}
    return GenerationConfig(generation_strategy=strategy, sample=False, max_steps=40, **extra)


def decoded(generator: Generator, prompt: list[int], strategy: str) -> tuple[list[int], str]:
    result = generator.generate(prompt, settings(strategy))
    return result.token_ids, result.stop_reason


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_smaller_max_position_embeddings_ends_decoding_there(strategy: str) -> None:
    model = make_tiny_model("llama_mha_untied", max_position_embeddings=32)
    generator = Generator(model, IdTokenizer())
    tokens, reason = decoded(generator, PROMPT, strategy)
    assert (len(PROMPT) + len(tokens), reason) == (32, "context_length")
    model.config.max_position_embeddings = 20
    tokens, reason = decoded(generator, PROMPT, strategy)
    assert (len(PROMPT) + len(tokens), reason) == (20, "context_length")
    assert (tokens, reason) == decoded(Generator(model, IdTokenizer()), PROMPT, strategy)


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_larger_max_position_embeddings_takes_the_prompts_it_holds(strategy: str) -> None:
    model = make_tiny_model("llama_mha_untied", max_position_embeddings=16)
    generator = Generator(model, IdTokenizer())
    generator.generate(PROMPT, settings(strategy))
    model.config.max_position_embeddings = 40
    longer = PROMPT * 2  # 20 tokens: past the old context, inside the new one
    tokens, reason = decoded(generator, longer, strategy)
    assert (len(longer) + len(tokens), reason) == (40, "context_length")
    assert (tokens, reason) == decoded(Generator(model, IdTokenizer()), longer, strategy)
    batched = generator.generate_batch([longer, PROMPT], settings(strategy))
    assert [len(result.token_ids) for result in batched] == [20, 30]


@pytest.mark.parametrize("family", ["llama_longrope", "phi3_longrope"])
def test_a_moved_longrope_switch_point_ends_decoding_there(family: str) -> None:
    model = make_tiny_model(family)
    generator = Generator(model, IdTokenizer())
    tokens, _ = decoded(generator, PROMPT, "self_speculative")
    assert len(PROMPT) + len(tokens) == ROPE_SWITCH
    switch = ROPE_SWITCH - 8
    model.config.rope_parameters["original_max_position_embeddings"] = switch
    if family == "phi3_longrope":  # its cache reset reads the top-level setting
        model.config.original_max_position_embeddings = switch
    for strategy in ("autoregressive", "self_speculative"):
        tokens, reason = decoded(generator, PROMPT, strategy)
        assert (len(PROMPT) + len(tokens), reason) == (switch, "context_length"), strategy
        assert (tokens, reason) == decoded(Generator(model, IdTokenizer()), PROMPT, strategy)
    assert generator.layerwise.context_length == switch
