"""Compiled passes kept on disk (``self_speculation.precompiled``): a second process (here:
a second Generator, as a new process would build it) loads them instead of tracing again,
decodes the same tokens, and reads its own model's weights, not the first one's."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
import weakref

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model
from torch._dynamo.utils import counters

from self_speculation import GenerationConfig, Generator, precompiled

pytestmark = pytest.mark.skipif(
    not precompiled.available(), reason="this torch cannot save compiled functions (torch 2.11)"
)

PROMPTS = [[100, 101, 102], [3, 4]]


@pytest.fixture()
def kept_in(tmp_path, monkeypatch):
    monkeypatch.setenv(precompiled.DIRECTORY_VARIABLE, str(tmp_path))
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    return tmp_path


def config(strategy: str, compile: bool) -> GenerationConfig:
    extra = {} if strategy == "autoregressive" else {"exit_layer": 2, "num_speculations": 3}
    return GenerationConfig(
        max_steps=12, sample=False, generation_strategy=strategy, compile=compile, **extra
    )


def fresh(seed: int) -> Generator:
    return Generator(
        make_tiny_model("llama_mha_untied", seed=seed, dtype=torch.float32), IdTokenizer()
    )


def token_ids(generator: Generator, strategy: str, compile: bool) -> list[list[int]]:
    return [r.token_ids for r in generator.generate_batch(PROMPTS, config(strategy, compile))]


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_second_generator_loads_the_saved_passes_instead_of_tracing(
    kept_in, strategy: str, caplog
) -> None:
    first = fresh(seed=0)
    expected = token_ids(first, strategy, compile=False)
    assert token_ids(first, strategy, compile=True) == expected
    saved = sorted(kept_in.glob("*.pt2"))
    assert saved  # one file per compiled pass

    graphs = counters["stats"]["unique_graphs"]
    month = time.time() - 31 * 86400
    for path in saved:  # loaded below: marked as used, so never pruned while in use
        os.utime(path, (month, month))
    second = fresh(seed=0)
    with caplog.at_level(logging.INFO, logger="self_speculation.passes"):
        assert token_ids(second, strategy, compile=True) == expected
    assert counters["stats"]["unique_graphs"] == graphs  # nothing traced
    assert caplog.text.count("loading the compiled") == len(saved)
    assert all(path.stat().st_mtime > month + 86400 for path in saved)
    assert sorted(kept_in.glob("*.pt2")) == saved
    # Another cache capacity (the column dimension is dynamic in the saved code too).
    longer = dataclasses.replace(config(strategy, True), max_steps=300)
    assert [r.token_ids for r in second.generate_batch(PROMPTS, longer)] == [
        r.token_ids
        for r in first.generate_batch(PROMPTS, dataclasses.replace(longer, compile=False))
    ]
    assert counters["stats"]["unique_graphs"] == graphs
    # More stop ids (a dynamic size of the greedy steps' books): the same saved pass, and
    # rows that stop on them as eager decoding's do.
    stops = sorted({row[len(row) // 2] for row in expected} | {expected[0][1]})
    stopping = dataclasses.replace(config(strategy, True), stop_token_ids=stops)
    results = second.generate_batch(PROMPTS, stopping)
    eager = first.generate_batch(PROMPTS, dataclasses.replace(stopping, compile=False))
    assert [(r.token_ids, r.stop_reason) for r in results] == [
        (r.token_ids, r.stop_reason) for r in eager
    ]
    assert "eos" in {r.stop_reason for r in results}
    assert counters["stats"]["unique_graphs"] == graphs
    assert sorted(kept_in.glob("*.pt2")) == saved

    # Another model of the same structure: the same files, its own weights.
    other = fresh(seed=1)
    other_expected = token_ids(other, strategy, compile=False)
    assert other_expected != expected
    assert token_ids(other, strategy, compile=True) == other_expected
    assert counters["stats"]["unique_graphs"] == graphs


def test_another_structure_or_dtype_gets_its_own_files(kept_in) -> None:
    token_ids(fresh(seed=0), "autoregressive", compile=True)
    saved = set(kept_in.glob("*.pt2"))
    wider = Generator(
        make_tiny_model("llama_mha_untied", dtype=torch.float32, intermediate_size=48),
        IdTokenizer(),
    )
    token_ids(wider, "autoregressive", compile=True)
    double = Generator(make_tiny_model("llama_mha_untied", dtype=torch.float64), IdTokenizer())
    assert token_ids(double, "autoregressive", compile=True) == token_ids(
        double, "autoregressive", compile=False
    )
    assert len(set(kept_in.glob("*.pt2")) - saved) == 2 * len(saved)


def test_a_damaged_file_is_compiled_again_with_a_warning(kept_in, caplog) -> None:
    expected = token_ids(fresh(seed=0), "autoregressive", compile=True)
    for path in kept_in.glob("*.pt2"):
        path.write_bytes(b"not a compiled function")
    with caplog.at_level(logging.WARNING):
        assert token_ids(fresh(seed=0), "autoregressive", compile=True) == expected
    assert "ignoring the saved compiled pass" in caplog.text
    assert all(path.stat().st_size > 100 for path in kept_in.glob("*.pt2"))  # saved again
    assert not list(kept_in.glob("*.part"))


def test_switched_off_nothing_is_kept(kept_in, monkeypatch) -> None:
    monkeypatch.setenv("LAYERSKIP_PRECOMPILE", "0")
    expected = token_ids(fresh(seed=0), "self_speculative", compile=False)
    assert token_ids(fresh(seed=0), "self_speculative", compile=True) == expected
    assert not list(kept_in.iterdir())


def test_a_tied_head_and_an_untied_one_do_not_share_files(kept_in) -> None:
    """Same config, but one model's head is its own tensor: the traced code differs."""
    tied = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    token_ids(tied, "autoregressive", compile=True)
    untied_model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    with torch.no_grad():
        head = untied_model.lm_head.weight.clone()
        untied_model.lm_head.weight = torch.nn.Parameter(head + torch.randn_like(head))
    untied = Generator(untied_model, IdTokenizer())
    expected = token_ids(untied, "autoregressive", compile=False)
    assert token_ids(untied, "autoregressive", compile=True) == expected


def test_a_generator_and_its_model_are_freed_after_use(kept_in) -> None:
    generator = fresh(seed=0)
    token_ids(generator, "self_speculative", compile=True)
    model = weakref.ref(generator.model)
    del generator
    gc.collect()
    assert model() is None


def test_a_saved_pass_that_does_not_fit_is_replaced(kept_in, monkeypatch, caplog) -> None:
    """A file from an earlier process that loads but fails when called is compiled again
    and saved in its place, so that the next process loads a pass that fits."""
    expected = token_ids(fresh(seed=0), "autoregressive", compile=True)
    real_load, loads = precompiled.load, []

    def failing_once(path):
        loads.append(path)
        kept = real_load(path)
        if len(loads) > 1 or kept is None:
            return kept

        def does_not_fit(*args):
            raise RuntimeError("a guard the file was saved with fails here")

        return does_not_fit

    monkeypatch.setattr(precompiled, "load", failing_once)
    with caplog.at_level(logging.WARNING):
        assert token_ids(fresh(seed=0), "autoregressive", compile=True) == expected
    assert "does not fit, compiling it again" in caplog.text
    monkeypatch.setattr(precompiled, "load", real_load)
    caplog.clear()
    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.INFO, logger="self_speculation.passes"):
        assert token_ids(fresh(seed=0), "autoregressive", compile=True) == expected
    assert "does not fit" not in caplog.text and "loading the compiled" in caplog.text
    assert counters["stats"]["unique_graphs"] == graphs  # the replaced file loaded


def test_a_torch_without_aot_compile_keeps_nothing(monkeypatch) -> None:
    """torch 2.11 has load_compiled_function, but its compiled functions no aot_compile:
    not available (before, each pass hashed the model and then gave up)."""
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    precompiled.available.cache_clear()
    try:
        assert not precompiled.available()
    finally:
        precompiled.available.cache_clear()


def test_a_model_with_hooks_is_not_kept_on_disk(kept_in) -> None:
    """A hook runs inside the compiled pass, and a file's name cannot tell two closures of
    one factory apart (a hook replaced by another of other values loaded the first one's
    pass): passes of a model with hooks are compiled in the process, never kept."""
    generator = Generator(make_tiny_model("llama_mha_untied", dtype=torch.float32), IdTokenizer())
    scale = lambda factor: lambda module, args, out: out * factor  # noqa: E731
    handle = generator.model.model.layers[2].register_forward_hook(scale(3.0))
    config = GenerationConfig(max_steps=6, sample=False, compile=True)
    first = generator.generate([5, 7, 9, 11, 13], config).token_ids
    assert not list(kept_in.rglob("*.pt2"))
    handle.remove()
    generator.model.model.layers[2].register_forward_hook(scale(-5.0))
    eager = generator.generate([5, 7, 9, 11, 13], dataclasses.replace(config, compile=False))
    assert generator.generate([5, 7, 9, 11, 13], config).token_ids == eager.token_ids != first
