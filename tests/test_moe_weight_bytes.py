"""benchmarks/engine.py's weight-streaming floor counts the weights a decoding step reads for
a token: of a mixture of experts' expert weights, only the experts the router picks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral_sliding", "deepseek_v2_mla"])
def test_expert_weights_count_for_the_experts_a_token_reads(family: str, monkeypatch) -> None:
    """4 experts, 2 picked per token: half of every expert weight is read; the routers,
    shared experts, attention and dense layers whole; one row of the untied embedding."""
    monkeypatch.syspath_prepend(str(_BENCHMARKS))
    import engine

    model = make_tiny_model(family, dtype=torch.float32)
    expert_modules = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert expert_modules and model.config.num_experts_per_tok == 2
    experts = _bytes(p for m in expert_modules for p in m.parameters())
    embedding = model.get_input_embeddings().weight
    everything = _bytes(model.parameters())
    if model.get_output_embeddings().weight is not embedding:
        everything -= _bytes([embedding])
    expected = everything - experts // 2 + embedding.shape[1] * embedding.element_size()
    assert engine.weight_bytes_per_token(model) == expected


def test_dense_models_count_every_weight_once(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(_BENCHMARKS))
    import engine

    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)  # tied head: counted once
    embedding = model.get_input_embeddings().weight
    expected = _bytes(model.parameters()) + embedding.shape[1] * embedding.element_size()
    assert engine.weight_bytes_per_token(model) == expected
