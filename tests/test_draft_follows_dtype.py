"""A model moved to another dtype after its Generator was made is followed (docs/models.md),
also with a draft exit attached: the exit adapter and the reduced vocabulary's head rows
move with it, instead of failing mid-generation with a raw dtype-mismatch RuntimeError."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation.draft import DraftExit, ExitAdapter

PROMPTS = [[5, 60, 7, 200, 31], [9], [40, 41, 42]]


def draft_for(generator: Generator, kind: str) -> DraftExit:
    adapter = None
    if kind in ("adapter", "both"):
        adapter = ExitAdapter(generator.layerwise, 2).requires_grad_(False)
    vocab = torch.arange(3, 200) if kind in ("vocab", "both") else None
    return DraftExit(generator.layerwise, adapter, vocab)


def configs(steps: int = 16) -> tuple[GenerationConfig, GenerationConfig]:
    plain = GenerationConfig(max_steps=steps, sample=False)
    speculative = GenerationConfig(
        max_steps=steps,
        sample=False,
        generation_strategy="self_speculative",
        exit_layer=2,
        num_speculations=3,
    )
    return plain, speculative


@pytest.mark.parametrize("kind", ["adapter", "vocab", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_draft_exit_follows_the_model_to_another_dtype(kind: str, dtype) -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    generator = Generator(model, make_tiny_tokenizer())
    generator.draft = draft_for(generator, kind)
    plain, speculative = configs()
    generator.generate(PROMPTS[0], speculative)  # passes built for float32
    model.to(dtype)
    results = generator.generate_batch(PROMPTS, speculative)
    assert all(result.num_drafted > 0 for result in results)
    draft = generator.draft
    if draft.adapter is not None:
        assert {p.dtype for p in draft.adapter.parameters()} == {dtype}
    if dtype == torch.float64:  # exact there: the drafts only propose
        reference = generator.generate_batch(PROMPTS, plain)
        assert [r.token_ids for r in results] == [r.token_ids for r in reference]
