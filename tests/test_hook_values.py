"""A hook's values changed between compiled generations (a steering hook's scale, a closure's
setting): the fast path decodes with the values as they are now, as eager code and
transformers' ``generate`` do, not with those its passes were first compiled with."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator

PROMPT = [5, 7, 9, 11, 13]
FAST = GenerationConfig(max_steps=8, sample=False, compile=True)
CONFIGS = [
    FAST,
    dataclasses.replace(
        FAST, generation_strategy="self_speculative", exit_layer=2, num_speculations=3
    ),
]


@pytest.fixture(autouse=True)
def _traced_not_built(monkeypatch) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")  # dynamo's guards, in seconds


class Steering:
    """A forward hook adding ``scale`` times a fixed direction to a layer's output."""

    def __init__(self, hidden_size: int) -> None:
        self.scale = 0.0
        self.direction = torch.randn(hidden_size, generator=torch.Generator().manual_seed(0))

    def __call__(self, module: torch.nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, tuple):
            return (output[0] + self.scale * self.direction, *output[1:])
        return output + self.scale * self.direction


def _own_generate(model: torch.nn.Module) -> list[int]:
    ids = torch.tensor([PROMPT])
    output = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return output[0, len(PROMPT) :].tolist()


def test_a_callable_hooks_attribute_changed_since_compiling_is_followed() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, seed=3)
    steering = Steering(model.config.hidden_size)
    model.model.layers[1].register_forward_hook(steering)
    generator = Generator(model, IdTokenizer())
    for scale in (0.0, 3.0):
        steering.scale = scale
        expected = _own_generate(model)
        for config in CONFIGS:
            assert generator.generate(PROMPT, config).token_ids == expected, (scale, config)


def test_a_closure_hooks_value_changed_since_compiling_is_followed() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, seed=3)
    sign = [1.0]
    model.model.norm.register_forward_hook(lambda module, args, output: output * sign[0])
    generator = Generator(model, IdTokenizer())
    for value in (1.0, -1.0):
        sign[0] = value
        expected = _own_generate(model)
        for config in CONFIGS:
            assert generator.generate(PROMPT, config).token_ids == expected, (value, config)
