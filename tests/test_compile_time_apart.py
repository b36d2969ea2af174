"""A pass compiled during a generation (the first call through the Python API, a later
prompt wider than the warm-up's) is counted in ``compile_seconds``, not in the result's
``total_time``: tokens per second measure decoding."""

from __future__ import annotations

import time

import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation.passes import ForwardPasses

COMPILING = 1.0  # seconds every first call of a pass is made to take


def test_compiling_during_a_generation_stays_out_of_its_time(monkeypatch) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    monkeypatch.setenv("LAYERSKIP_PRECOMPILE", "0")
    first_call = ForwardPasses._first_call

    def slow_first_call(self, key, function, args):
        time.sleep(COMPILING)
        return first_call(self, key, function, args)

    monkeypatch.setattr(ForwardPasses, "_first_call", slow_first_call)
    torch.manual_seed(0)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    generator = Generator(model, make_tiny_tokenizer())
    config = GenerationConfig(
        generation_strategy="self_speculative",
        exit_layer=2,
        num_speculations=3,
        sample=False,
        max_steps=8,
        compile=True,
    )
    result = generator.generate("def add(a, b):", config)
    assert generator.fast_path_fallback(config) is None
    assert generator.compile_seconds >= 2 * COMPILING  # the prefill and the step, at least
    assert 0 < result.total_time < COMPILING
    again = generator.generate("def add(a, b):", config)  # nothing left to compile
    assert again.token_ids == result.token_ids
    assert 0 < again.total_time < COMPILING
