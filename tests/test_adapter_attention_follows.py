"""Attention implementations and the masks the engine builds for them (hunt 60).

* An exit adapter runs the attention implementation its model selects now: after
  ``model.set_attn_implementation`` (which the Generator follows, building masks of the new
  form), an adapter made before must not keep the old one (an eager adapter adds a boolean
  sdpa mask to its scores, which masks nothing: it saw padding, stale and future columns).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.draft import DraftExit, ExitAdapter

PROMPTS = [[5, 60, 7, 200, 31, 9, 44, 12, 90, 3, 11, 19, 23], [17, 4], [8, 8, 9, 100, 101]]


@pytest.mark.parametrize(("first", "then"), [("eager", "sdpa"), ("sdpa", "eager")])
def test_an_exit_adapter_follows_the_model_s_attention_implementation(
    first: str, then: str
) -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    model.set_attn_implementation(first)
    generator = Generator(model, IdTokenizer())
    last = generator.num_layers - 1
    # A copy of the last layer at exit L - 1 reproduces the full model: every draft is right.
    adapter = ExitAdapter(generator.layerwise, last, init_layer=last).requires_grad_(False)
    generator.draft = DraftExit(generator.layerwise, adapter)
    model.set_attn_implementation(then)
    config = GenerationConfig(
        max_steps=24,
        sample=False,
        generation_strategy="self_speculative",
        exit_layer=last,
        num_speculations=4,
    )
    results = generator.generate_batch(PROMPTS, config)
    assert [result.acceptance_rate for result in results] == [1.0] * len(PROMPTS)
