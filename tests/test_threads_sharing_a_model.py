"""Threads sharing one model: a Generator made in one thread probes the model with its
sliding windows narrowed for a moment (``model_surgery._narrowed_windows``); a generation
running in another thread meanwhile decoded with the narrowed window (other tokens, then
a refusal that blamed the model). The probe now waits for running generations, and a
generation for a running probe."""

from __future__ import annotations

import threading

import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator

PROMPT = "def add(a, b):\n    return a + b\n"


def test_generators_made_while_another_thread_generates_change_nothing() -> None:
    torch.manual_seed(0)
    model = make_tiny_model(
        "mistral", dtype=torch.float32, initializer_range=0.3, sliding_window=12
    )
    tokenizer = make_tiny_tokenizer()
    config = GenerationConfig(sample=False, max_steps=40)
    generator = Generator(model, tokenizer)
    expected = generator.generate(PROMPT, config).token_ids
    stop, made, errors = threading.Event(), [], []

    def make_generators() -> None:
        try:
            while not stop.is_set():
                made.append(Generator(model, tokenizer))
                del made[:-1]
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    maker = threading.Thread(target=make_generators)
    maker.start()
    try:
        results = [generator.generate(PROMPT, config).token_ids for _ in range(8)]
    finally:
        stop.set()
        maker.join()
    assert not errors, errors
    assert len(made) == 1  # the other thread made Generators meanwhile
    assert all(tokens == expected for tokens in results)
    assert model.config.sliding_window == 12


def test_log_likelihoods_scored_while_another_thread_makes_generators_change_nothing() -> None:
    """eval.py's scoring path (``LayerSkipLM``) reads the model's settings too."""
    from self_speculation.eval_harness import LayerSkipLM

    torch.manual_seed(0)
    model = make_tiny_model(
        "mistral", dtype=torch.float32, initializer_range=0.3, sliding_window=12
    )
    tokenizer = make_tiny_tokenizer()
    lm = LayerSkipLM(Generator(model, tokenizer), GenerationConfig(sample=False), progress=False)
    context = tokenizer(PROMPT * 2)["input_ids"]
    continuation = context[-10:]
    expected = lm._continuation_logprob(context, continuation)
    stop, errors = threading.Event(), []

    def make_generators() -> None:
        try:
            while not stop.is_set():
                Generator(model, tokenizer)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    maker = threading.Thread(target=make_generators)
    maker.start()
    try:
        scores = [lm._continuation_logprob(context, continuation) for _ in range(40)]
    finally:
        stop.set()
        maker.join()
    assert not errors, errors
    assert all(score == expected for score in scores)
