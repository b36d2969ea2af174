"""Exits that accept most drafts: paths the other tests reach only rarely, since a random
model's early exits accept almost nothing.

* An exit adapter that copies the last layer at exit L - 1 IS the full model: with a
  correct adapter cache every tree / adaptive draft is accepted, so this checks the
  adapter layer's columns through the tree's path compaction (``move_columns``) and
  adaptive's chain switching, where a wrong column would only lower acceptance.
* A model whose layers past the first are damped (their residual outputs scaled by 0.2)
  drafts well from exit 1, so chains and trees accept several drafts per step: a stop
  token inside accepted drafts, ``max_steps`` inside a chain or tree, rows of a batch
  finishing apart and sliding windows of 4 crossed by rollbacks all happen.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation.draft import DraftExit, ExitAdapter

NUM_LAYERS = 4
PROMPTS = [[5], [5, 60, 7, 200, 31], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


def greedy(**settings) -> GenerationConfig:
    return GenerationConfig(**{"max_steps": 20, "sample": False, **settings})


@pytest.mark.parametrize(
    "settings",
    [
        dict(generation_strategy="tree", tree_branching=[2, 2, 1]),
        dict(generation_strategy="tree", tree_branching=[3, 1, 2]),
        dict(generation_strategy="adaptive", num_speculations=4),
    ],
)
def test_tree_and_adaptive_with_a_last_layer_adapter_accept_every_draft(settings) -> None:
    generator = Generator(make_tiny_model("qwen2_sliding"), make_tiny_tokenizer())
    reference = [r.token_ids for r in generator.generate_batch(PROMPTS, greedy())]
    adapter = ExitAdapter(generator.layerwise, NUM_LAYERS - 1).requires_grad_(False)
    generator.draft = DraftExit(generator.layerwise, adapter)
    batch = generator.generate_batch(PROMPTS, greedy(exit_layer=NUM_LAYERS - 1, **settings))
    assert [r.token_ids for r in batch] == reference
    for result in batch:
        assert result.num_drafted > 0
        # Every draft but those past the step limit in the last step is accepted.
        assert result.num_accepted == result.num_drafted, result.metrics()


@functools.cache
def damped_generator(family: str) -> Generator:
    model = make_tiny_model(family)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            for name, parameter in layer.named_parameters():
                if "o_proj" in name or "down_proj" in name:
                    parameter.mul_(0.2)
    return Generator(model, make_tiny_tokenizer())


@pytest.mark.parametrize("family", ["llama_mha_untied", "qwen2_sliding"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(generation_strategy="self_speculative", num_speculations=5),
        dict(generation_strategy="tree", tree_branching=[2, 1, 1, 1]),
        dict(generation_strategy="adaptive", num_speculations=8),
    ],
)
def test_well_drafting_exit_stops_inside_accepted_drafts_exactly(family, settings) -> None:
    generator = damped_generator(family)
    free = generator.generate(PROMPTS[1], greedy(max_steps=30))
    stop = [free.token_ids[6]]  # inside some row's accepted drafts
    for max_steps in (3, 11, 30):
        config = dict(max_steps=max_steps, stop_token_ids=stop)
        reference = [generator.generate(p, greedy(**config)) for p in PROMPTS]
        batch = generator.generate_batch(PROMPTS, greedy(exit_layer=1, **config, **settings))
        assert [r.token_ids for r in batch] == [r.token_ids for r in reference]
        assert [r.stop_reason for r in batch] == [r.stop_reason for r in reference]
        if max_steps == 30:
            accepted = sum(r.num_accepted for r in batch)
            assert accepted > sum(r.num_steps for r in batch)  # > 1 draft per step kept
