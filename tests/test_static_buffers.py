"""The compiled passes' cache buffers are CUDA-graph ready, checked on the CPU: allocated once
(per capacity bucket, kept across generations), marked as static addresses, never moved
during a generation (a batch that shrinks and drafts that get rolled back included), and
every input a compiled pass mutates is one that inductor's CUDA graphs treat as static
(the condition under which it would otherwise skip them: "mutated inputs").

The compiled passes here run on an inspecting backend (dynamo + AOT autograd, no inductor):
it records, per compiled graph, which inputs the graph mutates and which are static, and
runs the traced graph, in seconds. ``test_fast_path.py`` runs the same passes on inductor.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from functorch.compile import make_boxed_func
from tiny_models import IdTokenizer, make_tiny_model
from torch._dynamo.backends.common import aot_autograd

from self_speculation import GenerationConfig, Generator
from self_speculation.cpu_kernels import clear_stale_lock
from self_speculation.kv_cache import (
    CAPACITY_STEP,
    BufferPool,
    ColumnKVCache,
    capacity_bucket,
    is_static_address,
)
from self_speculation.passes import COMPILE_BACKEND_VARIABLE, PRECOMPILE_VARIABLE, ForwardPasses

PROMPTS = [[5, 7, 9, 11, 13], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]
BACKEND = "layerskip_static_check"
# Per compiled graph: (indices of the inputs it mutates, indices of its static inputs).
GRAPHS: list[tuple[list[int], set[int]]] = []


def _inspecting_compiler(graph: torch.fx.GraphModule, example_inputs) -> object:
    metadata = torch._guards.TracingContext.get().fw_metadata
    mutated = [index for index, info in enumerate(metadata.input_info) if info.mutates_data]
    GRAPHS.append((mutated, set(metadata.static_input_indices)))
    return make_boxed_func(graph.forward)


torch._dynamo.register_backend(aot_autograd(fw_compiler=_inspecting_compiler), name=BACKEND)


def config(strategy: str, compile: bool, **overrides) -> GenerationConfig:
    settings = dict(max_steps=24, sample=False, generation_strategy=strategy, compile=compile)
    if strategy == "self_speculative":
        settings.update(exit_layer=2, num_speculations=3)
    return GenerationConfig(**{**settings, **overrides})


def buffers(cache: ColumnKVCache) -> list[torch.Tensor]:
    return [buffer for buffer in (*cache.keys, *cache.values) if buffer is not None]


@pytest.fixture
def inspected(monkeypatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, BACKEND)
    GRAPHS.clear()


@pytest.mark.parametrize("strategy", ["self_speculative", "autoregressive"])
def test_buffers_keep_their_addresses_through_shrink_and_rollback(
    strategy: str, inspected, monkeypatch
) -> None:
    """A compiled batch of 3 rows that finish apart (the batch shrinks as they do):
    every call of every pass sees the same buffer addresses, all marked static; the
    second generation reuses the first one's buffers; tokens equal eager decoding."""
    generator = Generator(make_tiny_model("llama_mha_untied", dtype=torch.float32), IdTokenizer())
    free = generator.generate_batch(PROMPTS, config(strategy, False))
    stop = free[1].token_ids[5]  # ends row 1 early
    fast = config(strategy, True, stop_token_ids=[stop])
    eager = generator.generate_batch(PROMPTS, config(strategy, False, stop_token_ids=[stop]))
    assert len({r.num_steps for r in eager}) > 1  # the rows finish apart
    for size in (1, 2):  # compiles the batch sizes to which the batch may shrink
        generator.generate_batch(PROMPTS[:size], config(strategy, True, max_steps=2))
    passes = generator._passes(fast)
    seen: list[tuple[int, list[int], list[bool]]] = []  # (rows, addresses, static) per call
    timed = passes._timed

    def recording(key, function, *args):
        cache = next(arg for arg in args if isinstance(arg, ColumnKVCache))
        seen.append(
            (
                cache.rows,
                [buffer.data_ptr() for buffer in buffers(cache)],
                [is_static_address(buffer) for buffer in buffers(cache)],
            )
        )
        return timed(key, function, *args)

    monkeypatch.setattr(passes, "_timed", recording)
    first = generator.generate_batch(PROMPTS, fast)
    allocations = passes._pool.allocations
    second = generator.generate_batch(PROMPTS, fast)
    assert passes._pool.allocations == allocations  # the second generation reused them
    assert [r.token_ids for r in first] == [r.token_ids for r in eager]
    assert [r.token_ids for r in second] == [r.token_ids for r in eager]
    assert len({rows for rows, _, _ in seen}) > 1 and seen[0][0] == 3  # the batch shrank
    assert len({tuple(addresses) for _, addresses, _ in seen}) == 1
    assert all(all(static) for _, _, static in seen)
    if strategy == "self_speculative":
        assert any(r.num_accepted < r.num_drafted for r in first)  # drafts were rolled back


def test_every_input_a_compiled_pass_mutates_is_static(inspected) -> None:
    """CUDA graphs skip a graph that mutates a non-static input; the passes mutate only the
    cache buffers, which are static (on CPU, the same graphs as on CUDA bar the kernels)."""
    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    for strategy in ("autoregressive", "self_speculative"):
        generator.generate_batch(PROMPTS[:2], config(strategy, True, max_steps=6))
    assert len(GRAPHS) >= 2  # early; the greedy step (drafts, verification, acceptance)
    for mutated, static in GRAPHS:
        assert mutated, "a pass that writes no cache buffer"
        assert set(mutated) <= static


def test_select_rows_moves_rows_within_the_same_buffers() -> None:
    """Kept rows (in their new order) and columns from ``first_column`` move to the front of
    the buffers a pool lent; addresses stay, entries are those of the kept rows."""
    pool = BufferPool()
    cache = ColumnKVCache(2, 3, 10, dynamic=True, pool=pool)
    assert cache.capacity == capacity_bucket(10) == CAPACITY_STEP
    keys = torch.arange(3 * 2 * 10 * 4, dtype=torch.float32).view(3, 2, 10, 4)
    cache.write_columns = torch.arange(10).expand(3, 10)
    for layer in range(2):
        cache.update(keys + layer, -keys, layer)
    addresses = [buffer.data_ptr() for buffer in buffers(cache)]
    cache.select_rows(torch.tensor([2, 0]), first_column=3)
    assert [buffer.data_ptr() for buffer in buffers(cache)] == addresses
    assert all(is_static_address(buffer) for buffer in buffers(cache))
    assert cache.rows == 2 and cache.keys[0].shape == (2, 2, CAPACITY_STEP, 4)
    torch.testing.assert_close(cache.keys[1][:, :, :7], keys[[2, 0]][:, :, 3:] + 1)
    torch.testing.assert_close(cache.values[0][:, :, :7], -keys[[2, 0]][:, :, 3:])
    again = ColumnKVCache(2, 2, 100, pool=pool)  # the next generation, the same bucket
    again.write_columns = torch.arange(4).expand(2, 4)
    again.update(keys[:2, :, :4], keys[:2, :, :4], 0)
    assert again.keys[0].data_ptr() == addresses[0] and pool.allocations == 2


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog) -> None:
    """A backend failure (a compiler error, a graph break ``fullgraph`` refuses) on the first
    call: one warning naming the reason, then eager decoding with the same tokens."""

    def failing(graph, example_inputs):
        raise RuntimeError("no kernels today")

    torch._dynamo.register_backend(failing, name="layerskip_failing")
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "layerskip_failing")
    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    eager = generator.generate_batch(PROMPTS, config("self_speculative", False))
    with caplog.at_level(logging.WARNING, logger="self_speculation.passes"):
        fast = generator.generate_batch(PROMPTS, config("self_speculative", True))
        fast_again = generator.generate_batch(PROMPTS, config("self_speculative", True))
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]
    assert [r.token_ids for r in fast_again] == [r.token_ids for r in eager]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "no kernels today" in warnings[0], warnings
    assert "fast path off" in warnings[0]
    assert "no kernels today" in generator.fast_path_fallback(config("self_speculative", True))
    assert generator.fast_path_fallback(config("self_speculative", False)) is None
    assert generator._passes(config("self_speculative", True)).fallback_reason


def test_no_compiler_falls_back_to_eager_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.delenv(COMPILE_BACKEND_VARIABLE, raising=False)
    monkeypatch.setattr("self_speculation.passes.shutil.which", lambda name: None)
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="self_speculation.passes"):
        passes = ForwardPasses(Generator(model, IdTokenizer()).layerwise, compile=True)
    assert not passes.compiled
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "no C++ compiler found" in warning


def test_a_stale_build_lock_is_removed_with_one_warning(tmp_path, caplog) -> None:
    """A kernel build killed mid-way leaves its lock; the next build would wait forever."""
    lock = tmp_path / "lock"
    lock.touch()
    with caplog.at_level(logging.INFO, logger="self_speculation.cpu_kernels"):
        assert clear_stale_lock(lock, stale_after=0.5)  # waits, then removes it
    assert not lock.exists()
    messages = [record.getMessage() for record in caplog.records]
    assert any("stale build lock" in message for message in messages)
    assert not clear_stale_lock(lock)  # no lock: nothing to do


def test_compiled_code_is_not_shared_between_models(inspected) -> None:
    """Guards on the model's modules are dropped (their cost per call); the guard on the
    ``ForwardPasses`` instance keeps a Llama's compiled passes from serving a Qwen2 of the
    same shapes (whose projections have biases): each compiles its own, tokens exact."""
    for family in ("llama_gqa_tied", "qwen2"):
        generator = Generator(make_tiny_model(family, dtype=torch.float32), IdTokenizer())
        graphs = len(GRAPHS)
        eager = generator.generate_batch(PROMPTS[:1], config("autoregressive", False))
        fast = generator.generate_batch(PROMPTS[:1], config("autoregressive", True))
        assert [r.token_ids for r in fast] == [r.token_ids for r in eager], family
        assert len(GRAPHS) > graphs, family  # compiled for this model


@pytest.mark.parametrize(
    "settings",
    [
        dict(generation_strategy="self_speculative", exit_layer=2, num_speculations=3),
        dict(generation_strategy="tree", exit_layer=2, tree_branching=[2, 1]),
        dict(generation_strategy="adaptive", exit_layer=2, num_speculations=2),
    ],
    ids=lambda settings: settings["generation_strategy"],
)
def test_no_strategy_shares_compiled_code_between_models(settings: dict, monkeypatch) -> None:
    """Every compiled pass guards on its ``ForwardPasses`` (the tree step did not: a Qwen2
    after a Llama ran the Llama's compiled tree step, wrong tokens without a word). Nothing
    kept on disk, as on CUDA (a saved pass is called directly, without dynamo's dispatch)."""
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")  # dynamo traces: seconds
    monkeypatch.setenv(PRECOMPILE_VARIABLE, "0")
    for family in ("llama_gqa_tied", "qwen2"):
        generator = Generator(make_tiny_model(family, dtype=torch.float32), IdTokenizer())
        eager = generator.generate_batch(PROMPTS, config("autoregressive", False, max_steps=12))
        fast_config = GenerationConfig(max_steps=12, sample=False, compile=True, **settings)
        fast = generator.generate_batch(PROMPTS, fast_config)
        assert [r.token_ids for r in fast] == [r.token_ids for r in eager], family


def test_pooled_buffers_taken_in_inference_mode_serve_later_generations() -> None:
    """The pool outlives a generation: buffers first taken inside torch.inference_mode()
    were inference tensors, and the next generation outside it could not zero them."""
    pool = BufferPool()
    like = torch.zeros(2, 2, 1, 8)  # [batch, heads, new, head_dim]
    with torch.inference_mode():
        keys, _ = pool.take(0, CAPACITY_STEP, 2, like, like)
    assert not keys.is_inference()
    again, _ = pool.take(0, CAPACITY_STEP, 2, like, like)  # zeroed in place
    assert again.data_ptr() == keys.data_ptr()


def test_compiled_generations_in_and_out_of_inference_mode(inspected) -> None:
    generator = Generator(make_tiny_model("llama_mha_untied", dtype=torch.float32), IdTokenizer())
    eager = [
        r.token_ids for r in generator.generate_batch(PROMPTS, config("autoregressive", False))
    ]
    fast = config("autoregressive", True)
    with torch.inference_mode():
        inside = [r.token_ids for r in generator.generate_batch(PROMPTS, fast)]
    outside = [r.token_ids for r in generator.generate_batch(PROMPTS, fast)]
    assert inside == outside == eager


def test_inductor_freezing_from_the_environment_is_off_for_our_passes(monkeypatch) -> None:
    """TORCHINDUCTOR_FREEZING=1: dynamo baked the pooled cache buffers into the graph as
    constants, so a cache of the next capacity bucket indexed out of bounds."""
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")  # dynamo traces: seconds
    generator = Generator(
        make_tiny_model("llama_mha_untied", dtype=torch.float32, max_position_embeddings=512),
        IdTokenizer(),
    )
    # (Not monkeypatch.setattr: undoing it on a torch config module hides the setting.)
    with torch._inductor.config.patch(freezing=True):
        for length in (5, CAPACITY_STEP + 40):  # two capacity buckets
            prompt = [3 + index % 50 for index in range(length)]
            eager = generator.generate(prompt, config("autoregressive", False, max_steps=8))
            fast = generator.generate(prompt, config("autoregressive", True, max_steps=8))
            assert fast.token_ids == eager.token_ids
    assert generator.fast_path_fallback() is None
    assert not torch._inductor.config.freezing


def test_out_of_memory_frees_the_sets_of_other_capacities_and_retries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool keeps buffer sets for up to four capacities (each as large as an eager
    decode's whole cache): on a GPU, a long run of varied prompt lengths at a large batch
    ran out of memory where eager decoding fits. An allocation that fails frees the other
    sets and is tried once more; with nothing to free the error stands."""
    pool = BufferPool()
    like = torch.zeros(2, 2, 1, 8)
    for capacity in (CAPACITY_STEP, 2 * CAPACITY_STEP):
        pool.take(0, capacity, 2, like, like)
    failures = iter([True])
    original = torch.Tensor.new_zeros

    def scarce(self, *size, **kwargs):
        if next(failures, False):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, *size, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", scarce)
    keys, _ = pool.take(0, 3 * CAPACITY_STEP, 2, like, like)
    assert keys.shape == (2, 2, 3 * CAPACITY_STEP, 8) and is_static_address(keys)
    assert pool.nbytes() == 2 * keys.numel() * keys.element_size()  # the others are gone
    assert "out of memory for the key/value buffers of 384 columns" in caplog.text

    failures = iter([True, True])
    with pytest.raises(torch.OutOfMemoryError):  # nothing else to free: not retried
        pool.take(1, 3 * CAPACITY_STEP, 2, like, like)


def test_an_unwritable_compile_cache_falls_back_at_once_with_one_warning(
    monkeypatch, caplog, tmp_path
) -> None:
    """A read-only inductor cache folder (warm or not) compiled for minutes and then fell
    back at its lock files: now at once, naming the folder."""
    monkeypatch.delenv(COMPILE_BACKEND_VARIABLE, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    real_access = os.access
    monkeypatch.setattr(
        "self_speculation.passes.os.access",
        lambda path, mode: path != str(tmp_path) and real_access(path, mode),
    )
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="self_speculation.passes"):
        passes = ForwardPasses(Generator(model, IdTokenizer()).layerwise, compile=True)
    assert not passes.compiled
    (warning,) = [record.getMessage() for record in caplog.records]
    assert f"inductor's cache folder {tmp_path} is not writable" in warning
