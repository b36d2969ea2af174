"""A config change the Generator refuses, then undone, leaves nothing behind: the layer-wise
view had already read the refused change's scalars (soft-capping) when the check refused
it, and the config, equal again to the one last read, was never read back: the view kept
the refused soft-capping and decoded other tokens than transformers, silently."""

from __future__ import annotations

import pytest
import torch
from test_config_changes import PROMPT, transformers_greedy
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator, UnsupportedModelError


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_refused_config_change_undone_decodes_as_before(strategy: str) -> None:
    model = make_tiny_model("gemma2_softcap_sliding", dtype=torch.float32, initializer_range=0.3)
    generator = Generator(model, IdTokenizer())
    extra = {} if strategy == "autoregressive" else {"exit_layer": 2, "num_speculations": 3}
    config = GenerationConfig(generation_strategy=strategy, sample=False, max_steps=30, **extra)
    before = generator.generate(PROMPT, config).token_ids
    assert before == transformers_greedy(model)
    old = model.config.final_logit_softcapping, model.config.sliding_window
    model.config.final_logit_softcapping, model.config.sliding_window = 0.5, 1  # 1: refused
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        generator.generate(PROMPT, config)
    model.config.final_logit_softcapping, model.config.sliding_window = old  # undone
    assert generator.generate(PROMPT, config).token_ids == before
    assert generator.layerwise.final_logit_softcapping == old[0]
