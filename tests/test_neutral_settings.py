"""Settings that change nothing are not reported, and a tokenizer object that names no
special tokens still decodes (Python API users pass their own)."""

from __future__ import annotations

import torch
from tiny_models import make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.model_support import unapplied_generation_settings


def test_neutral_min_p_and_empty_sequence_bias_are_not_reported() -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    model.generation_config.min_p = 0.0
    model.generation_config.sequence_bias = {}
    model.generation_config.min_new_tokens = 0
    model.generation_config.min_length = 1  # a prompt has at least one token
    assert unapplied_generation_settings(model) == []
    model.generation_config.min_new_tokens = 2
    model.generation_config.min_length = 5
    assert unapplied_generation_settings(model) == ["min_length=5", "min_new_tokens=2"]
    model.generation_config.min_new_tokens = None
    model.generation_config.min_length = 0
    model.generation_config.min_p = 0.05
    model.generation_config.sequence_bias = {(3,): -1.0}
    assert unapplied_generation_settings(model) == ["sequence_bias={(3,): -1.0}"]
    model.generation_config.do_sample = True  # min_p applies only when generate samples
    assert unapplied_generation_settings(model) == [
        "sequence_bias={(3,): -1.0}",
        "min_p=0.05",
        "do_sample=True",
    ]


def test_sampling_settings_of_a_greedy_checkpoint_are_not_reported() -> None:
    """A checkpoint with do_sample False: transformers' generate decodes greedily and
    applies none of its warpers, so they differ from nothing the engine does."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    settings = model.generation_config
    settings.temperature, settings.top_p, settings.top_k, settings.typical_p = 0.6, 0.9, 20, 0.5
    assert unapplied_generation_settings(model) == []
    settings.do_sample = True
    assert unapplied_generation_settings(model) == [
        "typical_p=0.5",
        "do_sample=True",
        "temperature=0.6",
        "top_k=20",
        "top_p=0.9",
    ]


class BareTokenizer:
    """Token ids in and out; no eos_token_id or pad_token_id attribute at all."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [int(part) for part in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def test_a_tokenizer_without_special_token_attributes_decodes_as_one_with_none() -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    model.generation_config.eos_token_id = None
    generator = Generator(model, BareTokenizer())
    assert generator.eos_token_ids == frozenset()
    assert generator.pad_token_id == 0
    config = GenerationConfig(
        max_steps=6,
        sample=False,
        generation_strategy="self_speculative",
        exit_layer=2,
        num_speculations=3,
    )
    result = generator.generate("5 6 7 8", config)
    reference = generator.generate(
        "5 6 7 8", GenerationConfig(max_steps=6, sample=False, generation_strategy="autoregressive")
    )
    assert result.token_ids == reference.token_ids and len(result.token_ids) == 6
    assert result.num_drafted > 0
