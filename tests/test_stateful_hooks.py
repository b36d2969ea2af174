"""A hook that keeps state (counts calls, appends what it sees) changes what a hooked
model's compiled passes read at every call: with their guards kept, each call compiled
again (a generation of 12 tokens ran minutes, and longer with each call). After a few
compiles in a row of one pass the passes decode eagerly, with one warning; a value changed
once (a steering hook's scale) compiles once and stays
compiled."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator

PROMPT = [5, 7, 9, 11, 13]
CONFIG = GenerationConfig(
    generation_strategy="self_speculative",
    exit_layer=2,
    num_speculations=3,
    max_steps=24,
    sample=False,
    compile=True,
)


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module, args, output) -> None:
        self.calls += 1


class Scale:
    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, module, args, output):
        return output * self.scale


@pytest.fixture
def eager_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")


def test_a_counting_hook_sends_the_passes_eager(eager_backend) -> None:
    torch.manual_seed(0)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    counter = Counter()
    model.model.layers[1].register_forward_hook(counter)
    generator = Generator(model, IdTokenizer())
    expected = generator.generate(PROMPT, dataclasses.replace(CONFIG, compile=False))
    result = generator.generate(PROMPT, CONFIG)
    assert result.token_ids == expected.token_ids
    assert "compiled again at every call" in (generator.fast_path_fallback(CONFIG) or "")


def test_a_value_changed_between_generations_stays_compiled(eager_backend) -> None:
    torch.manual_seed(0)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    scale = Scale()
    model.model.layers[1].mlp.register_forward_hook(scale)
    generator = Generator(model, IdTokenizer())
    for value in (1.0, 0.5, 2.0, 0.25, 3.0, 1.5):  # more changes than HOOKED_RECOMPILES
        scale.scale = value
        expected = generator.generate(PROMPT, dataclasses.replace(CONFIG, compile=False))
        assert generator.generate(PROMPT, CONFIG).token_ids == expected.token_ids
        assert generator.fast_path_fallback(CONFIG) is None
