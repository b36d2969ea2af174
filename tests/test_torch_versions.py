"""The fast path on the torch versions pyproject.toml declares (``torch>=2.6``), checked on
the pinned torch by giving it an older torch's names and defaults: torch 2.6 names dynamo's
recompile limit ``cache_size_limit``, torch < 2.8 has no guard filter, and torch < 2.9
guards a static address on its identity by default."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model
from torch._dynamo.utils import counters

from self_speculation import GenerationConfig, Generator, passes
from self_speculation.passes import COMPILE_BACKEND_VARIABLE, PRECOMPILE_VARIABLE


def _compile_without(*names: str) -> object:
    """torch.compile as an older torch declares it: without the keyword arguments ``names``."""
    compile_ = torch.compile

    def old_compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor",
                    mode=None, options=None, disable=False, **kwargs):  # fmt: skip
        assert not set(kwargs) & set(names), kwargs
        return compile_(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend,
                        mode=mode, options=options, disable=disable, **kwargs)  # fmt: skip

    return old_compile


def test_recompile_limit_on_a_torch_that_names_it_cache_size_limit(monkeypatch) -> None:
    """torch 2.6: no ``recompile_limit`` argument nor config; the process-wide limit is
    ``cache_size_limit`` (compile_options raised AttributeError: a traceback for
    ``--compile True``, and for ``--compile auto`` on any long run)."""
    monkeypatch.setattr(torch, "compile", _compile_without("recompile_limit"))
    config = types.SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=256)
    monkeypatch.setattr(torch._dynamo, "config", config)
    options = passes.compile_options(torch.device("cuda"))
    assert "recompile_limit" not in options
    assert config.cache_size_limit == passes.RECOMPILE_LIMIT
    assert config.accumulated_cache_size_limit == 4 * passes.RECOMPILE_LIMIT


@pytest.fixture
def no_guard_filter(monkeypatch):
    """A torch.compiler without ``skip_guard_on_all_nn_modules_unsafe`` (torch < 2.8)."""
    monkeypatch.delattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", raising=False)
    cached = getattr(passes, "_guard_filter", None)
    if cached is not None:
        cached.cache_clear()
    yield
    if cached is not None:
        cached.cache_clear()


def test_a_torch_without_the_guard_filter_compiles_with_one_warning(
    no_guard_filter, monkeypatch, caplog
) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")  # dynamo traces: seconds
    monkeypatch.setenv(PRECOMPILE_VARIABLE, "0")
    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    settings = dict(max_steps=12, sample=False, generation_strategy="autoregressive")
    eager = generator.generate([5, 7, 9, 11], GenerationConfig(**settings)).token_ids
    with caplog.at_level(logging.WARNING, logger="self_speculation"):
        for device in ("cpu", "cuda", "cpu"):
            assert "guard_filter_fn" not in passes.compile_options(torch.device(device))["options"]
        fast = generator.generate([5, 7, 9, 11], GenerationConfig(**settings, compile=True))
    assert fast.token_ids == eager
    assert generator._passes(GenerationConfig(**settings, compile=True)).compiled
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "guard filter" in warnings[0], warnings


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_second_generation_compiles_nothing_where_static_addresses_guard(
    strategy: str, monkeypatch
) -> None:
    """torch < 2.9 marks a static address with a guard on its identity by default: every
    generation's new cache views then invalidated the compiled passes, which compiled
    again at each generation (minutes each on inductor; "Cache line invalidated because
    L['cache'].keys[6] got deallocated")."""
    mark = torch._dynamo.mark_static_address

    def guarding_by_default(tensor, guard=True):  # torch 2.6-2.8's default
        mark(tensor, guard=guard)

    monkeypatch.setattr(torch._dynamo, "mark_static_address", guarding_by_default)
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    monkeypatch.setenv(PRECOMPILE_VARIABLE, "0")
    generator = Generator(make_tiny_model("llama_mha_untied", dtype=torch.float32), IdTokenizer())
    extra = dict(exit_layer=2, num_speculations=3) if strategy == "self_speculative" else {}
    fast = GenerationConfig(
        max_steps=12, sample=False, generation_strategy=strategy, compile=True, **extra
    )
    first = generator.generate([5, 7, 9, 11], fast)
    graphs = counters["stats"]["unique_graphs"]
    compile_seconds = generator._passes(fast).compile_seconds
    second = generator.generate([5, 7, 9, 11], fast)
    assert second.token_ids == first.token_ids
    assert counters["stats"]["unique_graphs"] == graphs
    assert generator._passes(fast).compile_seconds == compile_seconds


def test_compile_auto_stays_eager_on_a_torch_the_fast_path_was_not_measured_on(
    monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """One loaded run on torch 2.6 decoded 24x slower compiled than eager: ``--compile auto``
    uses the fast path only on the torch versions it was measured on (>= 2.8), and says so;
    ``--compile True`` still compiles."""
    from arguments import COMPILE_BREAK_EVEN_TOKENS, GenerationArguments

    many = 10 * COMPILE_BREAK_EVEN_TOKENS
    assert GenerationArguments(compile="auto").compile_for(many)
    monkeypatch.delattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")
    auto = GenerationArguments(compile="auto")
    assert not auto.compile_for(many)
    assert GenerationArguments(compile="true").compile_for(many)
    with caplog.at_level(logging.INFO, logger="arguments"):
        auto.announce_compile(many)
    assert "eager decoding" in caplog.text and torch.__version__ in caplog.text
