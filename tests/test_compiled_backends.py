"""A long-lived process that makes and drops compiled Generators keeps none of their
torch.compile backend wrappers (dynamo's ``cached_backends``: one per torch.compile call,
ten per set of compiled passes, freed by nothing but torch._dynamo.reset())."""

from __future__ import annotations

import gc

import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator

CONFIG = GenerationConfig(sample=False, max_steps=4, compile=True)


def test_dropped_generators_leave_no_backend_wrappers(monkeypatch) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    monkeypatch.setenv("LAYERSKIP_PRECOMPILE", "0")
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    cached = torch._dynamo.eval_frame.cached_backends
    sizes = []
    for _ in range(3):
        generator = Generator(model, IdTokenizer())
        generator.generate([5, 6], CONFIG)
        del generator
        gc.collect()
        sizes.append(len(cached))
    assert sizes[0] == sizes[1] == sizes[2]
