"""Compiled passes go with their Generator: a long-lived process that makes Generators (or
whose passes are rebuilt: a draft set, the model moved, a hook) keeps no compiled version
of a dropped one, and never reaches dynamo's recompile limit through them."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation import passes as passes_module
from self_speculation.passes import ForwardPasses

CONFIG = GenerationConfig(
    generation_strategy="self_speculative",
    exit_layer=2,
    num_speculations=3,
    sample=False,
    max_steps=8,
    compile=True,
)
EAGER = dataclasses.replace(CONFIG, compile=False)


def _entries(function) -> int:
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__))


def test_dropped_generators_keep_no_compiled_versions(monkeypatch) -> None:
    # torch.compile's own dispatch (what CUDA, a hooked model or LAYERSKIP_PRECOMPILE=0 use).
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    monkeypatch.setenv("LAYERSKIP_PRECOMPILE", "0")
    monkeypatch.setattr(passes_module, "RECOMPILE_LIMIT", 2)
    torch.manual_seed(0)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    tokenizer = make_tiny_tokenizer()
    expected = Generator(model, tokenizer).generate("def add(a, b):", CONFIG).token_ids
    for _ in range(3):  # more Generators than the recompile limit, one after another
        generator = Generator(model, tokenizer)
        assert generator.generate("def add(a, b):", CONFIG).token_ids == expected
        assert generator.fast_path_fallback(CONFIG) is None
        del generator
        gc.collect()
    assert _entries(ForwardPasses._counted_greedy_step_eager) == 0


@pytest.mark.parametrize(
    "failure",
    [
        lambda: torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached"),
        lambda: torch._dynamo.exc.InternalTorchDynamoError("dynamo failed on a new family"),
        lambda: torch._dynamo.exc.TorchRuntimeError("an operator failed on fake tensors"),
        lambda: torch._dynamo.exc.UserError(
            torch._dynamo.exc.UserErrorType.DYNAMIC_CONTROL_FLOW, "data-dependent branch"
        ),
    ],
    ids=["past the recompile limit", "internal", "fake tensors", "user error"],
)
def test_dynamo_failures_while_tracing_fall_back_to_eager(monkeypatch, failure) -> None:
    """Dynamo's hard failure past the recompile limit (fullgraph), its internal errors,
    fake-tensor failures and user errors while compiling a pass were tracebacks: one
    warning naming the failure and eager decoding, same tokens."""
    monkeypatch.setenv("LAYERSKIP_PRECOMPILE", "0")

    def failing(function, **options):
        def call(*args, **kwargs):
            raise failure()

        return call

    torch.manual_seed(0)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    tokenizer = make_tiny_tokenizer()
    expected = Generator(model, tokenizer).generate("def add(a, b):", EAGER).token_ids
    monkeypatch.setattr(passes_module.torch, "compile", failing)
    generator = Generator(model, tokenizer)
    assert generator.generate("def add(a, b):", CONFIG).token_ids == expected
    reason = generator.fast_path_fallback(CONFIG) or ""
    assert "compiling the" in reason and type(failure()).__name__ in reason
