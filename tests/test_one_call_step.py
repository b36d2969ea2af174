"""One compiled call per step: greedy compiled steps (``ForwardPasses.decode_step`` for
autoregressive decoding, ``counted_greedy_step`` for self-speculation, ``counted_tree_step``
for trees) write their tokens
and keep the books (kept counts, stop reasons, statistics: ``bookkeeping``) inside the
compiled call, so that the loop runs no tensor operation of its own between steps but the
one read of the step's summary.

Traced with dynamo's eager backend (seconds); test_fast_path.py builds the same passes with
inductor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer
from torch.overrides import TorchFunctionMode

from self_speculation import GenerationConfig, Generator
from self_speculation.bookkeeping import RowBooks
from self_speculation.passes import COMPILE_BACKEND_VARIABLE, ForwardPasses
from self_speculation.strategies import (
    AutoRegressiveGenerationStrategy,
    SelfSpeculativeGenerationStrategy,
    TreeGenerationStrategy,
)

PROMPTS = [[5, 6, 7], [9] * 14, [40, 41, 42, 43, 44, 45, 46], [100]]
STRATEGIES = [
    dict(generation_strategy="autoregressive"),
    dict(generation_strategy="self_speculative", exit_layer=1, num_speculations=3),
    dict(generation_strategy="self_speculative", exit_layer=3, num_speculations=5),
    dict(generation_strategy="tree", exit_layer=1, tree_branching=[2, 2, 1]),
]
# The compiled step each strategy runs, its books inside.
COUNTED_STEPS = {
    "autoregressive": "decode_step",
    "self_speculative": "counted_greedy_step",
    "tree": "counted_tree_step",
}
STRATEGY_CLASSES = {
    "autoregressive": AutoRegressiveGenerationStrategy,
    "self_speculative": SelfSpeculativeGenerationStrategy,
    "tree": TreeGenerationStrategy,
}


@pytest.fixture(autouse=True)
def traced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")


@pytest.fixture(scope="module", params=["llama_gqa_tied", "qwen2"])
def generator(request: pytest.FixtureRequest) -> Generator:
    return Generator(make_tiny_model(request.param), make_tiny_tokenizer())


def _summary(results: list) -> list[tuple]:
    return [
        (r.token_ids, r.stop_reason, r.num_steps, r.num_drafted, r.num_accepted) for r in results
    ]


@pytest.mark.parametrize("settings", STRATEGIES, ids=lambda s: s["generation_strategy"])
@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "step_by_step"])
def test_books_kept_in_the_compiled_step_equal_the_loops_own(
    generator: Generator, settings: dict, ahead: bool
) -> None:
    """Tokens, stop reasons (stop tokens, limits), steps, drafts and accepted drafts of a
    batch whose rows finish apart are eager decoding's, with the books in the compiled
    step; also after rows leave the batch and with another batch of other lengths."""
    eager = generator.generate_batch(
        PROMPTS, GenerationConfig(sample=False, max_steps=24, **settings)
    )
    stops = sorted({result.token_ids[len(result.token_ids) // 3] for result in eager})[:2]
    config = GenerationConfig(sample=False, max_steps=24, stop_token_ids=stops, **settings)
    expected = _summary(generator.generate_batch(PROMPTS, config))
    assert {reason for _, reason, *_ in expected} == {"eos", "max_steps"}  # rows finish apart
    generator.steps_ahead = ahead
    try:
        compiled = dataclasses.replace(config, compile=True)
        passes = generator._passes(compiled)
        passes.pass_seconds = {}
        for shed in (True, False):
            generator.shed_finished_rows = shed
            assert _summary(generator.generate_batch(PROMPTS, compiled)) == expected
        kinds = {key[0] for key in passes.pass_seconds}
        passes.pass_seconds = None
        others = [[3], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
        assert _summary(generator.generate_batch(others, compiled)) == _summary(
            generator.generate_batch(others, config)
        )
    finally:
        generator.steps_ahead, generator.shed_finished_rows = None, True
    assert kinds == {COUNTED_STEPS[settings["generation_strategy"]]}


_GRAD_SWITCH = torch._C._set_grad_enabled


class _TensorCalls(TorchFunctionMode):
    """Counts the tensor operations run outside the passes (``ForwardPasses._timed``, where
    counting pauses) and the passes' calls."""

    def __init__(self) -> None:
        super().__init__()
        self.count = self.passes = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Not counted: attribute reads (shape, device) and no_grad's switches.
        operation = getattr(func, "__name__", "") != "__get__" and func is not _GRAD_SWITCH
        self.count += operation and not self.paused
        return func(*args, **(kwargs or {}))


def _tensor_calls(
    generator: Generator, config: GenerationConfig, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, int, int]:
    """Tensor operations outside the passes, pass calls and steps of one generation."""
    timed = ForwardPasses._timed

    def paused(self, *args):
        calls.passes += 1
        calls.paused = True
        try:
            return timed(self, *args)
        finally:
            calls.paused = False

    with monkeypatch.context() as patch, _TensorCalls() as calls:
        patch.setattr(ForwardPasses, "_timed", paused)
        (result,) = generator.generate_batch([PROMPTS[0]], config)
    return calls.count, calls.passes, result.num_steps


@pytest.mark.parametrize(
    "settings",
    [STRATEGIES[0], STRATEGIES[1], STRATEGIES[3]],
    ids=lambda s: s["generation_strategy"],
)
def test_a_compiled_step_is_one_call_and_no_tensor_operation_outside_it(
    generator: Generator, settings: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step is one call of a compiled pass, and between two calls the loop runs at
    most two tensor operations (the read of the step's summary, a view of its drafts):
    steps added to a generation add no more than that each. With the books kept outside
    (the strategies' eager bookkeeping), each step runs dozens."""

    def per_step(config: GenerationConfig) -> tuple[float, float]:
        generator.generate_batch([PROMPTS[0]], config)  # traced here, not counted
        short = _tensor_calls(generator, dataclasses.replace(config, max_steps=6), monkeypatch)
        long = _tensor_calls(generator, config, monkeypatch)
        steps = long[2] - short[2]
        assert steps > 4
        return (long[0] - short[0]) / steps, (long[1] - short[1]) / steps

    config = GenerationConfig(sample=False, max_steps=40, compile=True, **settings)
    operations, calls = per_step(config)
    assert operations <= 2 and calls == 1
    strategy = STRATEGY_CLASSES[settings["generation_strategy"]]
    monkeypatch.setattr(strategy, "_books_in_step", property(lambda self: False))
    operations, calls = per_step(config)
    assert operations > 10 and calls == 1


def test_a_compiled_step_mutates_no_input_but_the_cache(generator: Generator) -> None:
    """The compiled steps return new token, length and book tensors (a CUDA graph may only
    write inputs at static addresses, as the cache's buffers are): the caller's stay as
    they were."""
    config = GenerationConfig(sample=False, max_steps=8, compile=True, **STRATEGIES[1])
    generator.generate_batch(PROMPTS, config)
    strategy = generator._strategy(generator.resolve(config), None)
    state = strategy.prefill(PROMPTS, generator.pad_token_id, 8)
    books = RowBooks.start([8] * len(PROMPTS), [2], state.lengths.device)
    inputs = [state.tokens, state.lengths, *books.tensors()]
    before = [tensor.clone() for tensor in inputs]
    step = strategy.counted_step(state, 3, books)
    assert all(torch.equal(tensor, copy) for tensor, copy in zip(inputs, before))
    assert state.tokens is not inputs[0] and books.generated is not inputs[4]
    assert torch.equal(books.generated, step.kept) and bool((step.kept > 0).all())


@pytest.mark.parametrize(
    ("settings", "kinds"),
    [
        (
            dict(generation_strategy="tree", exit_layer=2, tree_branching=[2, 1]),
            {"counted_tree_step"},
        ),
        (dict(generation_strategy="adaptive", exit_layer=2, num_speculations=2), {"greedy_step"}),
    ],
    ids=["tree", "adaptive"],
)
def test_strategies_that_step_otherwise_use_their_own_passes(
    generator: Generator, settings: dict, kinds: set
) -> None:
    """Trees and adaptive chains draft with their own passes (trees with their books in
    their own step; adaptive keeps them outside): the plain chain's counted step must not
    stand in for them (their tokens are eager decoding's either way; the adaptive
    policy's cost model differs between the paths, so its drafts may too)."""
    config = GenerationConfig(sample=False, max_steps=12, compile=True, **settings)
    passes = generator._passes(config)
    passes.pass_seconds = {}
    try:
        fast = generator.generate_batch(PROMPTS, config)
        used = {key[0] for key in passes.pass_seconds}
    finally:
        passes.pass_seconds = None
    assert used == kinds
    eager = generator.generate_batch(PROMPTS, dataclasses.replace(config, compile=False))
    assert [(r.token_ids, r.stop_reason) for r in fast] == [
        (r.token_ids, r.stop_reason) for r in eager
    ]
