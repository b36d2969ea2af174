"""Models as researchers write or edit them (custom CausalLM classes, layers added by hand):
each decodes as its own greedy ``generate`` or is refused in one line naming the cause."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model
from transformers import LlamaForCausalLM, SuppressTokensLogitsProcessor

from self_speculation import GenerationConfig, Generator
from self_speculation.errors import UnsupportedModelError

PROMPT = [5, 7, 9, 11, 13]


def _own_generate(model: torch.nn.Module, max_new_tokens: int = 8) -> list[int]:
    ids = torch.tensor([PROMPT])
    output = model.generate(
        input_ids=ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False,
    )  # fmt: skip
    return output[0, len(PROMPT) :].tolist()


def _assert_decodes_as_own_generate(model: torch.nn.Module) -> None:
    """Autoregressive and self-speculative decoding give the model's own greedy tokens."""
    generator = Generator(model, IdTokenizer())
    plain = GenerationConfig(max_steps=8, sample=False)
    speculative = dataclasses.replace(
        plain, generation_strategy="self_speculative", exit_layer=2, num_speculations=3
    )
    expected = _own_generate(model)
    for config in (plain, speculative):
        assert generator.generate(PROMPT, config).token_ids == expected


class _OwnGenerate(LlamaForCausalLM):
    """As remote code does (Qwen's adds its stop words): defaults of its own in generate."""

    def generate(self, *args, **kwargs):
        kwargs.setdefault("suppress_tokens", list(range(200)))
        return super().generate(*args, **kwargs)


class _OwnProcessors(LlamaForCausalLM):
    def _get_logits_processor(self, *args, **kwargs):
        processors = super()._get_logits_processor(*args, **kwargs)
        processors.append(SuppressTokensLogitsProcessor(list(range(200))))
        return processors


@pytest.mark.parametrize(
    "cls, method", [(_OwnGenerate, "generate"), (_OwnProcessors, "_get_logits_processor")]
)
def test_a_class_with_its_own_generate_is_refused_not_decoded_otherwise(cls, method) -> None:
    """Its own generate suppresses tokens the engine would pick: the engine gave other
    tokens than the model's own greedy generate, without a word."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.__class__ = cls
    with pytest.raises(UnsupportedModelError, match=f"{cls.__name__}.{method} changes how"):
        Generator(model, IdTokenizer())


def test_layers_added_without_updating_the_config_are_named() -> None:
    """A duplicated block (its layer_idx set) with config.num_hidden_layers left at 4: the
    model's own forward runs the first 4 layers only. Was refused as "the layer-wise forward
    fails (list index out of range); this family needs an adapter"."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.model.layers.insert(2, copy.deepcopy(model.model.layers[1]))
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    with pytest.raises(UnsupportedModelError, match="config.num_hidden_layers is 4 but the model"):
        Generator(model, IdTokenizer())
    model.config.num_hidden_layers = 5
    generator = Generator(model, IdTokenizer())
    generator.generate(PROMPT, GenerationConfig(max_steps=2, sample=False))
    model.config.num_hidden_layers = 3  # changed after the Generator: named as well
    with pytest.raises(UnsupportedModelError, match="config.num_hidden_layers is 3 but the model"):
        generator.generate(PROMPT, GenerationConfig(max_steps=2, sample=False))


class _LastLogitsOnly(LlamaForCausalLM):
    """nanoGPT's habit: without labels, only the last position's logits (all generate reads)."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if kwargs.get("labels") is None:
            output.logits = output.logits[:, -1:]
        return output


def test_a_forward_keeping_the_last_logits_only_decodes_as_its_own_generate() -> None:
    """The load-time probe failed with an IndexError traceback (a [2, 12] mask over
    [2, 1, vocab] logits)."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.__class__ = _LastLogitsOnly
    _assert_decodes_as_own_generate(model)


class _SlicedVocabulary(LlamaForCausalLM):
    """A head padded past the tokenizer's vocabulary, the logits cut back to it."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits[..., :300]
        return output


def test_a_forward_cutting_the_vocabulary_is_one_line() -> None:
    """Was a RuntimeError traceback (tensor sizes 300 and 320); the engine's own head gives
    320 logits, so ids past 300 could be decoded."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.__class__ = _SlicedVocabulary
    with pytest.raises(UnsupportedModelError, match=r"returns logits of shape \[2, 12, 300\]"):
        Generator(model, IdTokenizer())


class _DroppedAttention(torch.nn.Module):
    """Attention removed from a layer (attention-drop pruning): the residual passes."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


def test_a_model_whose_first_layer_lost_its_attention_decodes_as_its_own_generate() -> None:
    """Layer 0 holds no keys, so the load probe's cached view sized its masks as if nothing
    were cached: "the layer-wise cached one-token forward differs ...; this family needs an
    adapter", for a model the engine decodes exactly."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.model.layers[0].self_attn = _DroppedAttention()
    _assert_decodes_as_own_generate(model)


class _MaskedVocabulary(LlamaForCausalLM):
    """A head padded past the tokenizer's vocabulary, its padding rows masked to -inf."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits[..., 300:] = float("-inf")
        return output


def test_a_forward_masking_token_ids_is_named_not_taken_for_broken_weights() -> None:
    """Was refused as "its own forward gives NaN or infinite logits in float32 (broken
    weights or an overflowing dtype)": the weights are fine, the forward masks 20 ids."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.__class__ = _MaskedVocabulary
    with pytest.raises(UnsupportedModelError, match="sets the logits of 20 token ids to -inf"):
        Generator(model, IdTokenizer())
