"""A reduced draft vocabulary on a model whose weights are inference tensors (made or
loaded inside ``torch.inference_mode``): such tensors keep no in-place version, and
``DraftExit`` read one to tell whether the head changed (RuntimeError "Inference tensors
do not track version counter" when the DraftExit was made). Their rows are copied at each
generation instead, so that a head changed in place inside inference mode is followed.
"""

from __future__ import annotations

import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation.draft import DraftExit

PROMPT = "def add(a, b):"
VOCAB = torch.arange(0, 320, 2)  # every other id


def _config(sample: bool) -> GenerationConfig:
    return GenerationConfig(
        generation_strategy="self_speculative",
        exit_layer=2,
        num_speculations=3,
        sample=sample,
        max_steps=16,
    )


def _model(seed: int) -> torch.nn.Module:
    with torch.inference_mode():
        return make_tiny_model(
            "llama_mha_untied", seed=seed, dtype=torch.float32, initializer_range=0.3
        )


def _generator(model: torch.nn.Module) -> Generator:
    generator = Generator(model, make_tiny_tokenizer())
    generator.draft = DraftExit(generator.layerwise, vocab=VOCAB)
    return generator


def _run(generator: Generator, sample: bool) -> tuple[list[int], int, int]:
    result = generator.generate(PROMPT, _config(sample), generator=torch.Generator().manual_seed(0))
    return result.token_ids, result.num_drafted, result.num_accepted


def test_a_draft_vocabulary_on_inference_weights_decodes_autoregressive_tokens() -> None:
    model = _model(0)
    assert model.lm_head.weight.is_inference()
    generator = _generator(model)
    plain = Generator(model, make_tiny_tokenizer())
    autoregressive = GenerationConfig(max_steps=16, sample=False)
    expected = plain.generate(PROMPT, autoregressive).token_ids
    assert _run(generator, sample=False)[0] == expected


def test_drafts_follow_inference_weights_changed_in_place() -> None:
    model = _model(0)
    kept = _generator(model)
    _run(kept, sample=True)
    with torch.inference_mode():  # where inference tensors may be written
        model.lm_head.weight.mul_(-1.5)
    fresh = _generator(model)
    for sample in (False, True):
        assert _run(kept, sample) == _run(fresh, sample)
