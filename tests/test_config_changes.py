"""A model's config changed after its Generator decoded with it: the next generation reads
the new values as transformers' own forward does (eager and compiled alike), never the
values its compiled passes or its layer-wise view saw before.

A compiled pass kept on disk (``precompiled``) runs without guard checks, so a sliding
window changed in the config after a compiled generation was silently ignored by compiled
decoding while eager decoding applied it; soft-capping was read once, when the Generator
was made, where transformers reads it at each forward.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator, precompiled

PROMPT = [5, 7, 9, 11, 13, 15, 17, 19, 21, 23]


@pytest.fixture()
def kept_in(tmp_path, monkeypatch):
    monkeypatch.setenv(precompiled.DIRECTORY_VARIABLE, str(tmp_path))
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    return tmp_path


def ours(generator: Generator, strategy: str, compile: bool) -> list[int]:
    extra = {} if strategy == "autoregressive" else {"exit_layer": 2, "num_speculations": 3}
    config = GenerationConfig(
        generation_strategy=strategy, sample=False, max_steps=30, compile=compile, **extra
    )
    return generator.generate(PROMPT, config).token_ids


def transformers_greedy(model: torch.nn.Module) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            do_sample=False,
            max_new_tokens=30,
            min_new_tokens=30,
            pad_token_id=2,
        )
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_sliding_window_changed_after_a_compiled_generation(kept_in, strategy) -> None:
    model = make_tiny_model("qwen2_sliding", dtype=torch.float32, initializer_range=0.3)
    generator = Generator(model, IdTokenizer())
    assert ours(generator, strategy, compile=True) == ours(generator, strategy, compile=False)
    model.config.sliding_window = 8
    expected = transformers_greedy(model)
    assert ours(generator, strategy, compile=False) == expected
    assert ours(generator, strategy, compile=True) == expected


def test_soft_capping_changed_after_the_generator_was_made(kept_in) -> None:
    model = make_tiny_model("gemma2_softcap_sliding", dtype=torch.float32, initializer_range=0.3)
    generator = Generator(model, IdTokenizer())
    ours(generator, "self_speculative", compile=True)
    model.config.final_logit_softcapping = 0.5
    expected = transformers_greedy(model)
    assert ours(generator, "autoregressive", compile=False) == expected
    assert ours(generator, "self_speculative", compile=True) == expected


def test_a_scalar_the_model_copied_from_its_config_is_read_from_the_model(kept_in) -> None:
    """Cohere's forward multiplies by the logit_scale it copied when it was made: a config
    changed afterwards changes nothing there, nor here (and is not refused)."""
    model = make_tiny_model("cohere", dtype=torch.float32, initializer_range=0.3)
    generator = Generator(model, IdTokenizer())
    before = ours(generator, "self_speculative", compile=False)
    model.config.logit_scale = 3.0
    assert transformers_greedy(model) == before
    assert ours(generator, "self_speculative", compile=False) == before


def test_an_unchanged_config_keeps_the_compiled_passes(kept_in) -> None:
    model = make_tiny_model("qwen2_sliding", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    ours(generator, "self_speculative", compile=True)
    passes = generator._forward_passes[True]
    ours(generator, "self_speculative", compile=False)
    ours(generator, "self_speculative", compile=True)
    assert generator._forward_passes[True] is passes


@pytest.mark.parametrize("family", ["granite_scalars", "granitemoe"])
def test_a_logits_scaling_changed_in_the_config_is_followed(kept_in, family) -> None:
    """Granite's forwards divide by the config's logits_scaling at each call (Granite MoE
    also keeps a copy it never reads): the probe, run again, agrees."""
    model = make_tiny_model(family, dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    before = ours(generator, "self_speculative", compile=False)
    model.config.logits_scaling = 0.25
    assert ours(generator, "self_speculative", compile=False) == before  # greedy: same order
    assert generator.layerwise.logits_scaling == 0.25
