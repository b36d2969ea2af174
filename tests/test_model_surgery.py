"""The layer-wise primitives reproduce the model's own forward, with and without caches."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, make_tiny_model, make_tiny_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM

from self_speculation import (
    GenerationConfig,
    Generator,
    LayerwiseModel,
    UnsupportedModelError,
    truncate_cache,
)

TOKENS = torch.tensor([[3, 17, 42, 5, 99, 23, 8, 61, 12, 77]])  # [1, 10]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_forward_matches_model(family: str) -> None:
    model = make_tiny_model(family)
    layerwise = LayerwiseModel(model)
    expected = model(input_ids=TOKENS).logits
    torch.testing.assert_close(layerwise.logits(TOKENS), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_autoregressive_greedy_matches_transformers_generate(family: str) -> None:
    """Our cache handling (sliding windows included) reproduces the model's own decoding."""
    model = make_tiny_model(family)
    generator = Generator(model, make_tiny_tokenizer())
    prompt = [5, 60, 7, 200, 31, 9]
    ours = generator.generate(prompt, GenerationConfig(max_steps=16, sample=False)).token_ids
    theirs = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert ours[: len(theirs)] == theirs and len(theirs) == 16


def test_granite_family_scalars_are_reproduced() -> None:
    config = GraniteConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        embedding_multiplier=3.0,
        logits_scaling=7.0,
        residual_multiplier=0.5,
    )
    torch.manual_seed(0)
    model = GraniteForCausalLM(config).to(torch.float64).eval()
    layerwise = LayerwiseModel(model)
    ids = TOKENS % 64
    torch.testing.assert_close(
        layerwise.logits(ids), model(input_ids=ids).logits, rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_verification_from_cached_exit_states_equals_fresh_forward(
    family: str, exit_layer: int
) -> None:
    """Draft-style: prefix through all layers, then new tokens one by one through [0, E)
    (filling the early caches), then all new tokens at once through [E, L)."""
    model = make_tiny_model(family)
    layerwise = LayerwiseModel(model)
    num_layers, prefix_length = layerwise.num_layers, 4
    cache = layerwise.new_cache()
    positions = torch.arange(prefix_length).unsqueeze(0)
    hidden = layerwise.embed(TOKENS[:, :prefix_length])
    layerwise.run_layers(hidden, 0, num_layers, cache, positions)

    exit_states = []
    for position in range(prefix_length, TOKENS.shape[1]):
        hidden = layerwise.embed(TOKENS[:, position : position + 1])
        exit_states.append(
            layerwise.run_layers(hidden, 0, exit_layer, cache, torch.tensor([[position]]))
        )
    exit_states = torch.cat(exit_states, dim=1)  # [1, 6, hidden]
    positions = torch.arange(prefix_length, TOKENS.shape[1]).unsqueeze(0)
    verified = layerwise.unembed(
        layerwise.run_layers(exit_states, exit_layer, num_layers, cache, positions)
    )
    fresh = model(input_ids=TOKENS).logits[:, prefix_length:]
    # Gemma 2's eager attention takes its softmax in float32 even for a float64 model.
    tolerance = 1e-6 if family.startswith("gemma2") else 1e-10
    torch.testing.assert_close(verified, fresh, rtol=0, atol=tolerance)
    for layer in cache.layers:
        assert layer.get_seq_length() == TOKENS.shape[1]


def test_truncate_cache_rolls_back_every_layer_and_keeps_shorter_ones() -> None:
    model = make_tiny_model("llama_gqa_tied")
    layerwise = LayerwiseModel(model)
    cache = layerwise.new_cache()
    layerwise.run_layers(layerwise.embed(TOKENS), 0, 4, cache, torch.arange(10).unsqueeze(0))
    extra = layerwise.embed(TOKENS[:, :3])
    layerwise.run_layers(extra, 0, 2, cache, torch.arange(10, 13).unsqueeze(0))
    assert [layer.get_seq_length() for layer in cache.layers] == [13, 13, 10, 10]
    truncate_cache(cache, 11)
    assert [layer.get_seq_length() for layer in cache.layers] == [11, 11, 10, 10]


def test_rolled_back_cache_gives_the_same_logits_as_a_fresh_forward() -> None:
    model = make_tiny_model("qwen2")
    layerwise = LayerwiseModel(model)
    cache = layerwise.new_cache()
    layerwise.run_layers(layerwise.embed(TOKENS), 0, 4, cache, torch.arange(10).unsqueeze(0))
    truncate_cache(cache, 6)
    hidden = layerwise.run_layers(
        layerwise.embed(TOKENS[:, 6:]), 0, 4, cache, torch.arange(6, 10).unsqueeze(0)
    )
    torch.testing.assert_close(
        layerwise.unembed(hidden), model(input_ids=TOKENS).logits[:, 6:], rtol=0, atol=1e-10
    )


def test_a_decoding_cache_that_shows_stale_columns_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The load-time probe runs the engine's own cache the way self-speculation writes it
    (rejected drafts left in later columns): masks that let a query see those columns
    decode wrong, and are refused before any decoding."""
    original = LayerwiseModel._column_masks

    def masks_showing_later_columns(self, hidden, layer_types, cache_index, cache, pad_counts):
        columns = cache.write_columns
        cache.write_columns = torch.full_like(columns, cache.columns(cache_index) - 1)
        try:
            return original(self, hidden, layer_types, cache_index, cache, pad_counts)
        finally:
            cache.write_columns = columns

    monkeypatch.setattr(LayerwiseModel, "_column_masks", masks_showing_later_columns)
    with pytest.raises(UnsupportedModelError, match="column-cache forward differs"):
        LayerwiseModel(make_tiny_model("llama_gqa_tied"))


def test_model_without_decoder_layers_is_rejected_with_a_clear_error() -> None:
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    with pytest.raises(UnsupportedModelError, match="decoder layers"):
        LayerwiseModel(GPT2LMHeadModel(config))


def test_family_whose_forward_differs_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_model("llama_mha_untied")
    original = model.forward

    def scaled_forward(*args, **kwargs):  # a "family" that rescales its logits
        output = original(*args, **kwargs)
        output.logits = output.logits * 2
        return output

    monkeypatch.setattr(model, "forward", scaled_forward)
    with pytest.raises(UnsupportedModelError, match="differs"):
        LayerwiseModel(model)
