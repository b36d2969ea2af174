"""Edges of three recent checks that mutations showed untested: a pad token that is also the
end- or beginning-of-sequence token is not warned about as padding; an empty list in a
checkpoint's generation config is neutral; the cutoffs of a greedy checkpoint (epsilon,
eta) are sampling-only settings, as temperature and top-p are."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model
from transformers import GenerationConfig as CheckpointConfig

from self_speculation import GenerationConfig, Generator
from self_speculation.model_support import unapplied_generation_settings
from self_speculation.sampling import applied_checkpoint_settings

CONFIG = GenerationConfig(max_steps=2, sample=False)


class EosPadTokenizer(IdTokenizer):
    eos_token_id = 3
    pad_token_id = 3  # Llama-style: padding with the end-of-sequence token


class BosPadTokenizer(IdTokenizer):
    bos_token_id = 2
    pad_token_id = 2


@pytest.mark.parametrize(
    ("tokenizer", "prompt"), [(EosPadTokenizer(), [5, 7, 3]), (BosPadTokenizer(), [2, 5, 7])]
)
def test_a_pad_token_that_is_eos_or_bos_is_not_warned_about(tokenizer, prompt, caplog) -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    generator = Generator(model, tokenizer)
    with caplog.at_level(logging.WARNING, logger="self_speculation.generator"):
        generator.generate(prompt, CONFIG)
    assert not any("pad token" in r.getMessage() for r in caplog.records)


def test_empty_lists_in_a_checkpoint_are_neutral() -> None:
    assert applied_checkpoint_settings(CheckpointConfig(suppress_tokens=[])) == {}
    assert applied_checkpoint_settings(CheckpointConfig(suppress_tokens=[4])) == {
        "suppress_tokens": [4]
    }


@pytest.mark.parametrize("name", ["epsilon_cutoff", "eta_cutoff", "min_p"])
def test_a_greedy_checkpoints_cutoffs_are_not_reported(name: str) -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    setattr(model.generation_config, name, 0.01)
    assert unapplied_generation_settings(model) == []
    model.generation_config.do_sample = True
    assert f"{name}=0.01" in unapplied_generation_settings(model)
