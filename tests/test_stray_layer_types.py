"""A config.json ``layer_types`` that the family's config class does not declare.

Mistral, Mixtral, Phi-3, Starcoder2 and Qwen3-MoE window every layer whenever
``sliding_window`` is set; their config classes have no ``layer_types`` field, so a
config.json that carries one keeps it as a stray attribute that their forward never reads
(AutoModel loads such a Mistral checkpoint as Ministral, which reads it; Mixtral, Phi-3 and
Starcoder2 ones, and a Mistral one loaded with ``MistralForCausalLM.from_pretrained``, keep
their class). The engine took that list at its word, treated the "full_attention" layers
as unwindowed, and the load-time probe then refused the model ("needs an adapter", or
remove ``sliding_window`` from config.json, which would change the model). It now follows
the family: every layer windowed, decoded like the model's own forward.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model, save_tiny_model
from transformers import AutoModelForCausalLM

from self_speculation import GenerationConfig, Generator, LayerwiseModel

STRAY = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
PROMPTS = [[5, 60, 7, 200, 31, 9, 44, 12, 90, 3], [17, 4], [8, 8, 9, 100, 101]]
MAX_STEPS = 16  # past the window of 4 in every row
FAMILIES = {
    "mistral_sliding": {},
    "mixtral_sliding": {},
    "starcoder2_sliding": {},
    "phi3": dict(sliding_window=4),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=4),
}


def _own_forward_tokens(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    """Greedy tokens of the model's own forward over the whole sequence at every step
    (transformers' cached generate builds window caches from the stray list and fails)."""
    tokens = model.generate(
        torch.tensor([prompt]), max_new_tokens=MAX_STEPS, do_sample=False, use_cache=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return tokens[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_stray_layer_types_list_is_not_read_by_a_family_that_windows_every_layer(
    family: str,
) -> None:
    model = make_tiny_model(
        family, dtype=torch.float32, layer_types=STRAY, eos_token_id=None, **FAMILIES[family]
    )
    assert model.config.layer_types == STRAY  # kept on the config, unread by the forward
    generator = Generator(model, IdTokenizer())  # was refused at load
    assert generator.layerwise.layer_types == ["sliding_attention"] * 4
    expected = [_own_forward_tokens(model, prompt) for prompt in PROMPTS]
    runs = [
        GenerationConfig(max_steps=MAX_STEPS, sample=False),
        GenerationConfig(
            max_steps=MAX_STEPS, sample=False, generation_strategy="self_speculative",
            exit_layer=1, num_speculations=3,
        ),
        GenerationConfig(
            max_steps=MAX_STEPS, sample=False, generation_strategy="self_speculative",
            exit_layer=3, num_speculations=5,
        ),
    ]  # fmt: skip
    for config in runs:
        ours = [generator.generate(prompt, config).token_ids for prompt in PROMPTS]
        assert ours == expected, config
        batched = [result.token_ids for result in generator.generate_batch(PROMPTS, config)]
        assert batched == expected, config


def test_a_saved_mixtral_with_a_stray_list_loads_and_windows_every_layer(tmp_path) -> None:
    directory = save_tiny_model(tmp_path / "m", "mixtral_sliding", layer_types=STRAY)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.layer_types == STRAY
    assert LayerwiseModel(model).layer_types == ["sliding_attention"] * 4


def test_a_family_that_declares_layer_types_still_follows_them() -> None:
    model = make_tiny_model("qwen2_sliding", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    assert generator.layerwise.layer_types == list(model.config.layer_types)
    assert "full_attention" in generator.layerwise.layer_types
