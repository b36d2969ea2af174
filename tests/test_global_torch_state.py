"""Compiled passes kept on disk run without guard checks: torch's global state that the
user set around a call (torch.autocast, the default dtype...) must still select a pass
compiled under that state, in this process and in a later one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, precompiled

PROMPT = "def add(a, b):"
COMPILED = GenerationConfig(sample=False, max_steps=12, compile=True)
EAGER = GenerationConfig(sample=False, max_steps=12)


@pytest.fixture()
def traced(monkeypatch, tmp_path):
    # aot_eager bakes autocast's casts into the pass as inductor does, in seconds.
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("LAYERSKIP_PRECOMPILED_DIR", str(tmp_path))
    if not precompiled.available():
        pytest.skip("this torch cannot keep compiled passes on disk")
    return tmp_path


def _generator() -> Generator:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    return Generator(model, make_tiny_tokenizer())


def _both(generator: Generator, autocast: bool) -> tuple[list[int], list[int]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        compiled = generator.generate(PROMPT, COMPILED).token_ids
        eager = generator.generate(PROMPT, EAGER).token_ids
    return compiled, eager


@pytest.mark.parametrize("autocast_first", [True, False])
def test_a_pass_compiled_under_autocast_is_not_run_without_it(traced, autocast_first) -> None:
    generator = _generator()
    for autocast in (autocast_first, not autocast_first):
        compiled, eager = _both(generator, autocast)
        assert compiled == eager, f"autocast {autocast}"
        assert torch.is_autocast_enabled("cpu") is False
    assert generator.fast_path_fallback(COMPILED) is None


def test_a_later_process_without_autocast_does_not_load_the_autocast_pass(traced) -> None:
    first = _generator()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first.generate(PROMPT, COMPILED)
    generator = _generator()  # new passes: they look on disk first, as a new process
    compiled, eager = _both(generator, autocast=False)
    assert compiled == eager
    # One file per state (with inductor the autocast one loaded silently and decoded wrong
    # tokens; with aot_eager it failed, and was replaced by the float32 one of the same name).
    assert len(list(traced.glob("decode_step-*.pt2"))) == 2


def test_the_file_name_follows_the_global_state(traced) -> None:
    def name() -> str:
        return precompiled.artifact_path("model", ("decode_step", 4, 1), (), {}).name

    plain = name()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert name() != plain
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert name() != plain
    finally:
        torch.set_default_dtype(previous)
    assert name() == plain


def test_a_generator_made_inside_autocast_accepts_the_model() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    expected = Generator(model, make_tiny_tokenizer()).generate(PROMPT, EAGER).token_ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generator = Generator(model, make_tiny_tokenizer())  # was: "needs an adapter"
        assert torch.is_autocast_enabled("cpu")
    assert generator.generate(PROMPT, EAGER).token_ids == expected


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative", "adaptive"])
def test_a_default_device_other_than_the_models_is_not_used(strategy) -> None:
    """torch.set_default_device("meta") (a "cuda" default with a CPU model, likewise) as
    transformers' generate takes it: the host tensors were made on the default device
    (meta: a traceback, "Cannot copy out of meta tensor"; adaptive: ".item() on meta")."""
    generator = _generator()
    drafting = {} if strategy == "autoregressive" else dict(exit_layer=2, num_speculations=3)
    config = GenerationConfig(generation_strategy=strategy, sample=False, max_steps=12, **drafting)
    expected = generator.generate_batch([PROMPT, "The"], EAGER)
    torch.set_default_device("meta")
    try:
        rows = generator.generate_batch([PROMPT, "The"], config)
    finally:
        torch.set_default_device(None)
    assert [row.token_ids for row in rows] == [row.token_ids for row in expected]


def test_a_new_global_state_counts_its_compile(traced) -> None:
    """A pass loaded from disk for a state first seen mid-process (under torch.autocast)
    traces nothing: its time is still compile time, not the generation's."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _generator().generate(PROMPT, COMPILED)  # saves the autocast pass
    generator = _generator()
    _both(generator, autocast=False)
    before = generator.compile_seconds
    _both(generator, autocast=True)  # loads the autocast pass
    assert generator.compile_seconds > before
