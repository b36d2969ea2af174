"""A token tree as deep as the model's context is refused in one line that names the
setting the user gave, ``tree_branching``; it named ``num_speculations``, which a tree's
caller never set (the depth stands for it)."""

from __future__ import annotations

import pytest
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator


def test_a_tree_as_deep_as_the_context_is_refused_naming_tree_branching() -> None:
    generator = Generator(make_tiny_model(max_position_embeddings=8), IdTokenizer())
    config = GenerationConfig(
        generation_strategy="tree", exit_layer=2, tree_branching=[1] * 8, sample=False
    )
    with pytest.raises(ConfigError, match=r"tree_branching \[1(, 1){7}\] is 8 deep") as info:
        generator.generate([5, 6, 7], config)
    assert "num_speculations" not in str(info.value) and "8 tokens" in str(info.value)
    # One level shallower fits: decoded up to the context.
    shallower = GenerationConfig(
        generation_strategy="tree", exit_layer=2, tree_branching=[1] * 7, sample=False
    )
    result = generator.generate([5, 6, 7], shallower)
    assert (len(result.token_ids), result.stop_reason) == (5, "context_length")


def test_a_chain_as_long_as_the_context_still_names_num_speculations() -> None:
    generator = Generator(make_tiny_model(max_position_embeddings=8), IdTokenizer())
    for strategy in ("self_speculative", "tree"):
        config = GenerationConfig(
            generation_strategy=strategy, exit_layer=2, num_speculations=8, sample=False
        )
        with pytest.raises(ConfigError, match="num_speculations must be below"):
            generator.generate([5, 6, 7], config)
