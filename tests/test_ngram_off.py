"""no_repeat_ngram_size 0 turns n-gram blocking off, the checkpoint's own setting too, as
transformers' generate(no_repeat_ngram_size=0) and lm-eval's HFLM (a task's
``no_repeat_ngram_size: 0``) do."""

from __future__ import annotations

import torch
from tiny_models import IdTokenizer, make_repeating_model

from self_speculation import GenerationConfig, Generator
from self_speculation.eval_harness import LayerSkipLM

PROMPT = [3, 1, 4]
STEPS = 12


def _model():
    model = make_repeating_model()
    model.generation_config.no_repeat_ngram_size = 1  # the checkpoint bans any repeat
    return model


def _hf(model, **kwargs) -> list[int]:
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, do_sample=False, max_new_tokens=STEPS, **kwargs)
    return out[0, len(PROMPT) :].tolist()


def test_zero_turns_off_the_checkpoints_ngram_ban() -> None:
    model = _model()
    generator = Generator(model, IdTokenizer())
    off = _hf(model, no_repeat_ngram_size=0)
    assert len(set(off)) < len(off)  # the setting matters here
    for strategy in (
        {},
        dict(generation_strategy="self_speculative", exit_layer=1, num_speculations=3),
    ):
        config = GenerationConfig(max_steps=STEPS, sample=False, no_repeat_ngram_size=0, **strategy)
        assert generator.generate(PROMPT, config).token_ids == off
        default = GenerationConfig(max_steps=STEPS, sample=False, **strategy)
        assert generator.generate(PROMPT, default).token_ids == _hf(model)  # checkpoint's


def test_a_tasks_zero_is_off_in_eval() -> None:
    model = _model()
    generator = Generator(model, IdTokenizer())
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=False)), progress=False)
    config, _ = lm._request_config({"no_repeat_ngram_size": 0, "until": [], "max_gen_toks": STEPS})
    assert generator.generate(PROMPT, config).token_ids == _hf(model, no_repeat_ngram_size=0)
