"""Modules left in training mode (an exit adapter or a model a user was training) decode
and score as in eval mode: dropout is off for the call, and each module's mode is as it
was afterwards. An adapter's hook keeps its passes off the disk, as a model's
does."""

from __future__ import annotations

import pytest
import torch
from test_eval_harness import Request
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, precompiled
from self_speculation.draft import DraftExit, ExitAdapter
from self_speculation.eval_harness import LayerSkipLM
from self_speculation.passes import ForwardPasses, missing_compiler

NUM_LAYERS = 4
PROMPTS = [[5], [5, 60, 7, 200, 31], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


def _generator(family: str = "llama_mha_untied", **dropout: float) -> Generator:
    model = make_tiny_model(family, **dropout)
    assert model.config.num_hidden_layers == NUM_LAYERS
    return Generator(model, make_tiny_tokenizer())


def test_an_adapter_in_training_mode_drafts_without_dropout() -> None:
    """The adapter copies the last layer at exit L - 1, so it is the full model: every
    draft is accepted, unless its residual dropout (Phi-3's, 0.5) is on."""
    generator = _generator("phi3", resid_pdrop=0.5)
    greedy = GenerationConfig(max_steps=20, sample=False)
    reference = [result.token_ids for result in generator.generate_batch(PROMPTS, greedy)]
    adapter = ExitAdapter(generator.layerwise, NUM_LAYERS - 1).requires_grad_(False)
    adapter.train()  # as a user's training loop leaves it
    generator.draft = DraftExit(generator.layerwise, adapter)
    config = GenerationConfig(
        max_steps=20, sample=False, generation_strategy="self_speculative",
        exit_layer=NUM_LAYERS - 1, num_speculations=4,
    )  # fmt: skip
    batch = generator.generate_batch(PROMPTS, config)
    assert [result.token_ids for result in batch] == reference
    for result in batch:
        assert result.num_drafted > 0 and result.num_accepted == result.num_drafted
    assert all(module.training for module in adapter.modules())  # left as it was


def test_a_model_in_training_mode_scores_without_dropout() -> None:
    generator = _generator(attention_dropout=0.5)
    config = generator.resolve(GenerationConfig(sample=False))
    requests = [Request(("def add(a, b):", "\n    return a + b"))]
    expected = LayerSkipLM(generator, config, progress=False).loglikelihood(requests)
    generator.model.train()
    for _ in range(3):
        scored = LayerSkipLM(generator, config, progress=False).loglikelihood(requests)
        assert scored == expected
    assert all(module.training for module in generator.model.modules())


@pytest.mark.skipif(
    not precompiled.available() or missing_compiler(torch.device("cpu")) is not None,
    reason="no passes kept on disk here",
)
def test_a_hooked_adapter_keeps_its_passes_off_the_disk() -> None:
    generator = _generator()
    adapter = ExitAdapter(generator.layerwise, NUM_LAYERS - 1).eval()
    draft = DraftExit(generator.layerwise, adapter)
    plain = ForwardPasses(generator.layerwise, True, draft)
    adapter.register_forward_hook(lambda module, args, output: None)
    hooked = ForwardPasses(generator.layerwise, True, draft)
    assert plain._keep_on_disk and not hooked._keep_on_disk
