"""A reduced draft vocabulary drafts from the model's head as it is at each generation.

``DraftExit`` copies the draft vocabulary's rows of the LM head once. A Generator kept
across a change of the head's weights made in place (``model.load_state_dict`` of another
checkpoint, a training step) drafted from the old rows: greedy tokens stayed exact, but
fewer drafts were accepted and a seed sampled other text than a new Generator and
DraftExit on the same model do.

Weights that are inference tensors (a model made or loaded inside
``torch.inference_mode``) keep no in-place version: ``DraftExit`` read one to tell whether
the head changed (RuntimeError "Inference tensors do not track version counter" when the
DraftExit was made); their rows are copied at each generation instead.
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


def test_drafts_follow_a_checkpoint_loaded_into_the_model() -> None:
    model = _model(0)
    kept = _generator(model)
    _run(kept, sample=True)
    model.load_state_dict(_model(1).state_dict())
    fresh = _generator(model)
    for sample in (False, True):
        assert _run(kept, sample) == _run(fresh, sample)


def test_drafts_follow_a_head_changed_in_place_inside_inference_mode() -> None:
    model = _model(0)
    with torch.inference_mode():
        kept = _generator(model)  # its copy of the rows is an inference tensor
        _run(kept, sample=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.5)
    fresh = _generator(model)
    for sample in (False, True):
        assert _run(kept, sample) == _run(fresh, sample)


def _inference_model(seed: int) -> torch.nn.Module:
    with torch.inference_mode():
        return _model(seed)


def test_a_draft_vocabulary_on_inference_weights_decodes_autoregressive_tokens() -> None:
    model = _inference_model(0)
    assert model.lm_head.weight.is_inference()
    generator = _generator(model)
    plain = Generator(model, make_tiny_tokenizer())
    autoregressive = GenerationConfig(max_steps=16, sample=False)
    expected = plain.generate(PROMPT, autoregressive).token_ids
    assert _run(generator, sample=False)[0] == expected


def test_drafts_follow_inference_weights_changed_in_place() -> None:
    model = _inference_model(0)
    kept = _generator(model)
    _run(kept, sample=True)
    with torch.inference_mode():  # where inference tensors may be written
        model.lm_head.weight.mul_(-1.5)
    fresh = _generator(model)
    for sample in (False, True):
        assert _run(kept, sample) == _run(fresh, sample)
