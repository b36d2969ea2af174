"""The KV cache reaches decoder layers and mask helpers under the name the installed
transformers uses: ``past_key_values`` up to 5.23, ``cache`` from 5.24 on (where the old name
is a deprecated alias, warned about at every run, due to go in 5.40, inside the range
pyproject.toml declares)."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from test_layer_types_families import CONFIGS, SIZES
from tiny_models import IdTokenizer, make_tiny_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from self_speculation import GenerationConfig, Generator, UnsupportedModelError

PROMPT = [5, 60, 7, 200, 31, 9, 44, 12, 90, 3]


class CacheOnlyLayer(nn.Module):
    """A decoder layer as transformers 5.40 declares one (and 5.25's new families do): the
    cache is ``cache``; a ``past_key_values`` goes to ``**kwargs``, which it does not read."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        parameters = inspect.signature(layer.forward).parameters  # the layer's own name for it
        self.keyword = "cache" if "cache" in parameters else "past_key_values"

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_embeddings=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        **kwargs,
    ):
        return self.layer(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=use_cache,
            **{self.keyword: cache},
        )


def _settings(strategy: str) -> GenerationConfig:
    extra = dict(exit_layer=2, num_speculations=3) if strategy == "self_speculative" else {}
    return GenerationConfig(max_steps=20, sample=False, generation_strategy=strategy, **extra)


def test_layers_that_take_the_cache_as_cache_decode_like_the_model() -> None:
    model = make_tiny_model("llama_gqa_tied")
    expected = Generator(model, IdTokenizer()).generate(PROMPT, _settings("autoregressive"))
    base = model.model
    base.layers = nn.ModuleList(CacheOnlyLayer(layer) for layer in base.layers)
    generator = Generator(model, IdTokenizer())  # the load-time check passes
    for strategy in ("autoregressive", "self_speculative"):
        result = generator.generate(PROMPT, _settings(strategy))
        assert result.token_ids == expected.token_ids, strategy


def test_decoding_raises_no_deprecation_warning_about_the_cache_name() -> None:
    model = make_tiny_model("gemma2_softcap_sliding")  # sliding and full masks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = Generator(model, IdTokenizer())
        for strategy in ("autoregressive", "self_speculative"):
            generator.generate(PROMPT, _settings(strategy))
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_cache_keyword_reads_the_signature() -> None:
    from self_speculation.model_surgery import cache_keyword

    def new(hidden_states, cache=None, **kwargs):
        return hidden_states

    def old(hidden_states, past_key_values=None, **kwargs):
        return hidden_states

    assert cache_keyword(new) == "cache"
    assert cache_keyword(old) == "past_key_values"
    assert cache_keyword(lambda hidden_states, **kwargs: hidden_states) in (
        "cache",
        "past_key_values",
    )


def _gemma4(**overrides):
    config = AutoConfig.for_model("gemma4_text", **{**SIZES, **CONFIGS["gemma4_text"], **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_gemma4_layers_that_store_their_keys_decode_like_generate() -> None:
    """transformers 5.24 marks the last layer of each attention type of every Gemma 4 model
    as storing its keys and values in a dict the model's forward hands each layer."""
    model = _gemma4()
    generator = Generator(model, IdTokenizer())
    theirs = model.generate(
        torch.tensor([PROMPT]),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(PROMPT) :].tolist()
    for strategy in ("autoregressive", "self_speculative"):
        ours = generator.generate(PROMPT, _settings(strategy)).token_ids
        assert ours == theirs[: len(ours)] and ours, strategy


def test_gemma4_kv_sharing_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModelError, match="reuses another layer's keys and values"):
        Generator(_gemma4(num_kv_shared_layers=2), IdTokenizer())


def test_a_transformers_older_than_the_declared_bound_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers 5.0-5.13 install under the old ``transformers>=5.0`` but fail every
    model's load-time check (their mask helpers take ``input_embeds`` / no ``layer_idx``),
    with a message that blames the model family."""
    from self_speculation import model_support

    monkeypatch.setattr(model_support.transformers, "__version__", "5.13.1")
    with pytest.raises(UnsupportedModelError, match=r"transformers 5\.13\.1 is installed.*>= 5\."):
        Generator(make_tiny_model("llama_gqa_tied"), IdTokenizer())
    root = Path(__file__).resolve().parents[1]
    # A plain search, not tomllib: the package takes Python 3.10, which lacks it.
    declared = re.findall(r'"(transformers[^"]*)"', (root / "pyproject.toml").read_text())
    assert declared == [f"transformers>={model_support.MIN_TRANSFORMERS},<6"]
