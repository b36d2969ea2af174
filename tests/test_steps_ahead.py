"""Steps issued ahead of the host's reads (``Generator.steps_ahead``, the default on GPUs).

On a GPU the generator issues step t + 1 before it reads step t's kept counts, so that the
device never waits for the host's bookkeeping. The same code runs here on the CPU: the
results must be those of reading every step before the next, and the loop must read the
device once per step, after issuing the next one, and nowhere else.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer
from torch.overrides import TorchFunctionMode

from self_speculation import GenerationConfig, Generator
from self_speculation import generator as generator_module
from self_speculation.passes import COMPILE_BACKEND_VARIABLE

# Rows of very different lengths; stop tokens frequent enough that rows finish apart.
PROMPTS = [[5, 6, 7], [9] * 14, [40, 41, 42, 43, 44, 45, 46], [100]]
STRATEGIES = [
    dict(generation_strategy="autoregressive"),
    dict(generation_strategy="self_speculative", exit_layer=1, num_speculations=3),
    dict(generation_strategy="self_speculative", exit_layer=3, num_speculations=5),
    dict(generation_strategy="tree", exit_layer=2, num_speculations=2, tree_branching=[2, 1]),
    dict(generation_strategy="adaptive", exit_layer=2, num_speculations=4),
]


def _results(generator: Generator, ahead: bool, settings: dict, **config) -> list:
    generator.steps_ahead = ahead
    try:
        return generator.generate_batch(
            PROMPTS, GenerationConfig(sample=False, **settings, **config)
        )
    finally:
        generator.steps_ahead = None


def _summary(result) -> tuple:
    return (
        result.token_ids,
        result.stop_reason,
        result.num_steps,
        result.num_drafted,
        result.num_accepted,
    )


@pytest.fixture(scope="module", params=["llama_gqa_tied", "qwen2"])
def generator(request: pytest.FixtureRequest) -> Generator:
    return Generator(make_tiny_model(request.param), make_tiny_tokenizer())


@pytest.mark.parametrize("settings", STRATEGIES, ids=lambda s: s["generation_strategy"])
@pytest.mark.parametrize("shed", [True, False], ids=["shed", "keep_rows"])
def test_steps_ahead_decode_what_step_by_step_decoding_does(
    generator: Generator, settings: dict, shed: bool
) -> None:
    reference = _results(generator, False, settings, max_steps=24)
    stop = sorted({result.token_ids[len(result.token_ids) // 3] for result in reference})[:2]
    generator.shed_finished_rows = shed
    try:
        for config in (dict(max_steps=24), dict(max_steps=24, stop_token_ids=stop)):
            step_by_step = _results(generator, False, settings, **config)
            ahead = _results(generator, True, settings, **config)
            assert [_summary(r) for r in ahead] == [_summary(r) for r in step_by_step]
    finally:
        generator.shed_finished_rows = True
    # The stop tokens made rows finish apart (some on them, some at the limit).
    with_stops = _results(generator, True, settings, max_steps=24, stop_token_ids=stop)
    assert {result.stop_reason for result in with_stops} == {"eos", "max_steps"}


def test_sampled_autoregressive_steps_ahead_draw_the_same_tokens(generator: Generator) -> None:
    def sampled(ahead: bool) -> list[list[int]]:
        generator.steps_ahead = ahead
        try:
            results = generator.generate_batch(
                PROMPTS,
                GenerationConfig(generation_strategy="autoregressive", sample=True, max_steps=16),
                generator=torch.Generator().manual_seed(3),
            )
        finally:
            generator.steps_ahead = None
        return [result.token_ids for result in results]

    assert sampled(True) == sampled(False)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "batch"])
def test_sampled_self_speculation_steps_ahead_draw_what_step_by_step_decoding_draws(
    generator: Generator, prompts: list[list[int]]
) -> None:
    """Both modes plan each step from the counts read before the previous one, so a seed
    gives the same text with a streamer (step by step) as without (ahead). Rows are kept
    to the end: when finished rows leave, a batch's draws follow its size."""

    def sampled(ahead: bool) -> list[tuple]:
        generator.steps_ahead, generator.shed_finished_rows = ahead, False
        try:
            results = generator.generate_batch(
                prompts,
                GenerationConfig(
                    generation_strategy="self_speculative",
                    exit_layer=2,
                    num_speculations=4,
                    sample=True,
                    max_steps=14,
                ),
                generator=torch.Generator().manual_seed(5),
            )
        finally:
            generator.steps_ahead, generator.shed_finished_rows = None, True
        return [_summary(result) for result in results]

    assert sampled(True) == sampled(False)


class _HostReads(TorchFunctionMode):
    """Counts the reads of tensor values into Python and the tensors made from Python values
    (on a GPU each one waits for the device)."""

    READS = {
        torch.tensor,
        torch.Tensor.tolist,
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
        torch.Tensor.__float__,
    }

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _loop_reads(
    generator: Generator, settings: dict, max_steps: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[str]]:
    """Host reads besides the loop's one per step, and the order of issued steps and reads."""
    events = []
    values, strategy = generator_module._HostRead.values, Generator._strategy

    def logged_values(self) -> list[int]:
        events.append("read")
        return values(self)

    def logged_strategy(self, *args, **kwargs):
        built = strategy(self, *args, **kwargs)
        step = built.counted_step

        def logged_step(*step_args, **step_kwargs):
            events.append("step")
            return step(*step_args, **step_kwargs)

        built.counted_step = logged_step
        return built

    with monkeypatch.context() as patch:
        patch.setattr(generator_module._HostRead, "values", logged_values)
        patch.setattr(Generator, "_strategy", logged_strategy)
        patch.setattr(generator, "steps_ahead", True)
        with _HostReads() as reads:
            generator.generate_batch(
                [PROMPTS[0]], GenerationConfig(sample=False, max_steps=max_steps, **settings)
            )
    return reads.count - events.count("read"), events


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("settings", STRATEGIES[:4], ids=lambda s: s["generation_strategy"])
def test_the_loop_reads_the_device_once_per_step_after_issuing_the_next(
    generator: Generator, settings: dict, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if compiled:  # the compiled passes (traced, not built): the fused greedy step
        monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
        settings = dict(settings, compile=True)
    # What a first generation makes once (compiled passes, a tree's tables) is made here.
    generator.generate_batch([PROMPTS[0]], GenerationConfig(sample=False, **settings))
    short_reads, short_events = _loop_reads(generator, settings, 6, monkeypatch)
    long_reads, long_events = _loop_reads(generator, settings, 30, monkeypatch)
    # Step t + 1 is issued before step t's counts are read: step, read, step, read, ...
    for events in (short_events, long_events):
        assert events == ["step", "read"] * (len(events) // 2)
    assert len(long_events) > len(short_events)
    # Nothing else in a step reads the device: other reads do not grow with the steps.
    assert long_reads == short_reads
