"""transformers' own ``generate`` with a static cache between two compiled generations of a
Generator: it keeps the cache's length on the model (``_previous_max_cache_length``), which
the Generator took for a changed module setting, so it dropped its compiled passes and
compiled every one again (on CUDA their graphs too; benchmarks/engine.py's batch part
recompiled the shapes its single-prompt paths had compiled, minutes on a CPU)."""

from __future__ import annotations

import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.passes import COMPILE_BACKEND_VARIABLE, PRECOMPILE_VARIABLE


def test_transformers_static_generate_keeps_our_compiled_passes(monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")  # dynamo traces: seconds
    monkeypatch.setenv(PRECOMPILE_VARIABLE, "0")
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    config = GenerationConfig(max_steps=6, sample=False, compile=True)
    first = generator.generate([5, 7, 9], config)
    passes = generator._passes(config)
    ids = torch.tensor([[5, 7, 9]])
    for length in (32, 48):  # each call keeps its (largest) cache length on the model
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            cache_implementation="static",
            max_cache_len=length,
        )
        assert model._previous_max_cache_length == length
        again = generator.generate([5, 7, 9], config)
        assert again.token_ids == first.token_ids
        assert generator._passes(config) is passes  # not dropped: nothing compiled again
