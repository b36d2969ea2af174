"""Coverage the family tests lack: Gemma 3 with full-attention layers beside its
sliding ones (tests/tiny_models.py's gemma3_text has 4 layers, all sliding, so its second
rotary table, linear-scaled as in gemma-3-4b and larger, never ran), and Gemma 4's text
decoder without per-layer inputs (per-layer head_dim, proportional partial RoPE on full
layers). Both decode exactly; these tests keep it so."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from self_speculation import GenerationConfig, Generator

ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
SIZES = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    pad_token_id=2, bos_token_id=0, eos_token_id=1, layer_types=ALTERNATING, sliding_window=3,
)  # fmt: skip
CONFIGS = {
    "gemma3_text": dict(
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        }
    ),
    "gemma4_text": dict(
        vocab_size_per_layer_input=300,
        hidden_size_per_layer_input=0,
        per_layer_config={"01": {"head_dim": 32}, "03": {"head_dim": 32}},
    ),
}
PROMPTS = [[7], [5, 60, 7, 200, 31, 9, 44], list(range(40, 70))]


def settings(strategy: str = "autoregressive", **extra) -> GenerationConfig:
    return GenerationConfig(max_steps=24, sample=False, generation_strategy=strategy, **extra)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_mixed_layer_families_decode_like_generate(model_type: str) -> None:
    config = AutoConfig.for_model(model_type, **{**SIZES, **CONFIGS[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = Generator(model, IdTokenizer())
    theirs = [
        model.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        for p in PROMPTS
    ]
    runs = [
        settings(),
        settings("self_speculative", exit_layer=1, num_speculations=4),
        settings("self_speculative", exit_layer=3, num_speculations=1),
        settings("tree", exit_layer=2, tree_branching=[2, 2, 1]),
        settings("adaptive", exit_layer=1, num_speculations=4),
    ]
    for config_ in runs:
        for prompt, expected in zip(PROMPTS, theirs, strict=True):
            ours = generator.generate(prompt, config_).token_ids
            assert ours == expected[: len(ours)] and ours, (config_.generation_strategy, prompt)
        batched = [r.token_ids for r in generator.generate_batch(PROMPTS, config_)]
        assert all(b == e[: len(b)] for b, e in zip(batched, theirs, strict=True))
