"""The fast path (compiled passes over the column cache) gives the eager path's tokens and
compiles once per (batch size, exit layer, k), never again during or across generations.

Compiled in float32: the CPU's compiled kernels are the ones users run. Each compile of
a tiny model takes seconds to tens of seconds, so the checks share compiled generators.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, IdTokenizer, make_tiny_model, save_tiny_model
from torch._dynamo.utils import counters

from self_speculation import GenerationConfig, Generator, LayerwiseModel
from self_speculation.cpu_kernels import MAX_ROWS, ONE_ROW_MIN_WEIGHTS, load_few_row_kernel
from self_speculation.passes import compile_options

PROMPTS = [[5, 7, 9, 11, 13], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]


@functools.cache
def generator_for(family: str) -> Generator:
    return Generator(make_tiny_model(family, dtype=torch.float32), IdTokenizer())


def config(strategy: str, compile: bool, **overrides) -> GenerationConfig:
    settings = dict(max_steps=16, sample=False, generation_strategy=strategy, compile=compile)
    if strategy == "self_speculative":
        settings.update(exit_layer=2, num_speculations=3)
    return GenerationConfig(**{**settings, **overrides})


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_fast_path_tokens_equal_the_eager_path_with_rows_finishing_apart(strategy: str) -> None:
    """A batch whose rows stop at different steps (an end-of-sequence token in one row,
    the step limit in the others) decodes the same tokens compiled as eager, and a second
    batch of other prompt lengths reuses the compiled code."""
    generator = generator_for("llama_gqa_tied")
    free = generator.generate_batch(PROMPTS, config(strategy, False))
    stop = free[1].token_ids[5]  # ends row 1 after six tokens
    eager = generator.generate_batch(PROMPTS, config(strategy, False, stop_token_ids=[stop]))
    fast = generator.generate_batch(PROMPTS, config(strategy, True, stop_token_ids=[stop]))
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]
    assert [r.stop_reason for r in fast] == [r.stop_reason for r in eager]
    assert len({len(r.token_ids) for r in fast}) > 1  # the rows really finished apart
    assert generator.compile_seconds > 0

    graphs = unique_graphs()
    others = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [6], [7, 7]]
    longer = generator.generate_batch(others, config(strategy, True, max_steps=40))
    assert unique_graphs() == graphs  # new prompt lengths, new cache size: no recompilation
    assert [r.token_ids for r in longer] == [
        r.token_ids for r in generator.generate_batch(others, config(strategy, False, max_steps=40))
    ]


@pytest.mark.parametrize("family", ["llama_gqa_tied", "qwen2", "gemma2_softcap_sliding"])
def test_one_call_greedy_step_equals_the_passes_called_apart(family: str, monkeypatch) -> None:
    """A greedy step in one call (drafts, verification of the first num_drafts, acceptance,
    the token write and the bookkeeping: ForwardPasses.counted_greedy_step, the compiled
    path's step; run eagerly here) decodes what the passes called apart decode: tokens,
    drafts, acceptance and steps, batched, including the last steps that draft fewer than
    k."""
    from self_speculation.strategies import SelfSpeculativeGenerationStrategy

    generator = generator_for(family)
    # Exit layer 3 of 4: drafts that agree often, so that a step that drafts fewer than k
    # would accept past its drafts if it verified the ones it did not ask for.
    # 3 tokens: the first step may keep at most 3, so it drafts 2 of k = 3.
    speculatives = [
        config("self_speculative", False, max_steps=steps, exit_layer=3) for steps in (14, 3)
    ]
    speculative = speculatives[0]
    steps: list[list] = []  # per step: what each row kept, drafts, acceptance
    step = SelfSpeculativeGenerationStrategy.counted_step

    def recording(self, state, num_drafts, books):
        result = step(self, state, num_drafts, books)
        kept = [row[:count] for row, count in zip(result.new_tokens.tolist(), result.new_counts)]
        steps[-1].append((kept, result.draft_tokens.tolist(), result.accepted_counts.tolist()))
        return result

    monkeypatch.setattr(SelfSpeculativeGenerationStrategy, "counted_step", recording)
    steps.append([])
    apart = [r for c in speculatives for r in generator.generate_batch(PROMPTS, c)]
    monkeypatch.setattr(
        SelfSpeculativeGenerationStrategy, "_fused_step", property(lambda self: True)
    )
    passes = generator._passes(speculative)
    passes.pass_seconds = {}
    steps.append([])
    try:
        one_call = [r for c in speculatives for r in generator.generate_batch(PROMPTS, c)]
        kinds = {key[0] for key in passes.pass_seconds}
    finally:
        passes.pass_seconds = None
    assert kinds == {"counted_greedy_step"}
    assert steps[1] == steps[0]
    short = [(drafts, accepted) for _, drafts, accepted in steps[1] if len(drafts[0]) < 3]
    assert short  # steps that drafted fewer than k
    assert all(max(accepted) <= len(drafts[0]) for drafts, accepted in short)
    summary = [(r.token_ids, r.num_drafted, r.num_accepted, r.num_steps) for r in one_call]
    assert summary == [(r.token_ids, r.num_drafted, r.num_accepted, r.num_steps) for r in apart]
    autoregressive = [
        r
        for steps in (14, 3)
        for r in generator.generate_batch(PROMPTS, config("autoregressive", False, max_steps=steps))
    ]
    assert [r.token_ids for r in one_call] == [r.token_ids for r in autoregressive]


@pytest.mark.slow
def test_compiled_batches_shrink_only_to_compiled_sizes() -> None:
    """Finished rows leave a compiled batch only for a batch size already compiled (never
    a compilation mid-run): here 3 rows go straight to 1 once one row is left running."""
    generator = generator_for("llama_mha_untied")  # its rows finish at different steps
    speculative = config("self_speculative", True, max_steps=24)
    generator.generate(PROMPTS[0], speculative)  # compiles batch size 1
    eager = generator.generate_batch(PROMPTS, config("self_speculative", False, max_steps=24))
    steps = sorted(r.num_steps for r in eager)
    assert steps[0] < steps[1] < steps[2]  # two rows stop before the last one
    generator.generate_batch(PROMPTS, dataclasses.replace(speculative, max_steps=2))  # batch 3
    passes = generator._passes(speculative)
    graphs, passes.pass_seconds = unique_graphs(), {}
    try:
        fast = generator.generate_batch(PROMPTS, speculative)
    finally:
        timed, passes.pass_seconds = passes.pass_seconds, None
    assert unique_graphs() == graphs
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]
    calls = {}  # batch size -> verification calls (greedy compiled steps: one call each)
    for key, (_, count) in timed.items():
        if key[0] in ("verify", "counted_greedy_step"):
            calls[key[2]] = calls.get(key[2], 0) + count
    assert calls == {3: steps[1], 1: steps[2] - steps[1]}


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama_gqa_tied"])
def test_fast_path_self_speculation_equals_autoregressive_for_every_family(family: str) -> None:
    """Compiled drafts ([0, E) + head) and verification ([0, E) for the last draft, then
    [E, L) + head) reproduce the eager autoregressive tokens of every tested family."""
    generator = generator_for(family)
    reference = [
        r.token_ids for r in generator.generate_batch(PROMPTS, config("autoregressive", False))
    ]
    fast = generator.generate_batch(PROMPTS, config("self_speculative", True))
    assert [r.token_ids for r in fast] == reference


@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 2))
def test_few_row_kernel_equals_a_linear_layer(rows: int) -> None:
    """Every row count (the last one past the kernel's limit goes to BLAS), sizes that are
    not multiples of the kernel's vector width or column block."""
    assert load_few_row_kernel(), "the fast path's kernel did not build on this machine"
    generator = torch.Generator().manual_seed(rows)
    for inputs, outputs in [(3, 5), (19, 37), (64, 130), (200, 67)]:
        x = torch.randn(rows, inputs, generator=generator)
        w = torch.randn(outputs, inputs, generator=generator)
        product = torch.ops.layerskip.few_row_linear(x, w)
        torch.testing.assert_close(product, torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_options_are_accepted_by_torch_compile(device: str) -> None:
    """torch.compile takes the options built for each device (the first GPU run failed
    here: a mode and options together are refused); CUDA graphs are asked for on CUDA."""
    options = compile_options(torch.device(device))
    assert not ("mode" in options and "options" in options)
    assert options["options"].get("triton.cudagraphs", False) == (device == "cuda")
    # CPU: kernels and wrapper built apart (the wrapper at -O1), for a shorter cold compile.
    assert options["options"].get("cpp_wrapper_build_separate", False) == (device == "cpu")
    torch.compile(lambda x: x + 1, **options)  # validates its arguments, compiles nothing


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_compiled_pass_gets_the_guard_filter(device: str, monkeypatch) -> None:
    """torch.compile takes ``guard_filter_fn`` out of the options dict it is given: the
    passes get a dict each, so every one of them drops the module guards (with one dict
    shared, only the first did, and the others re-checked every weight on each call)."""
    from self_speculation import passes, precompiled

    precompiled.available()  # its own probe's torch.compile, cached: not one of the passes
    real_compile = torch.compile
    filtered = []

    def recording(function, **options):
        filtered.append("guard_filter_fn" in options.get("options", {}))
        return real_compile(function, **options)  # takes the filter out of its dict

    monkeypatch.setattr(passes.torch, "compile", recording)
    monkeypatch.setattr(passes, "missing_compiler", lambda device: None)
    monkeypatch.setattr(
        passes,
        "compile_options",
        lambda _, module_guards=False: compile_options(torch.device(device), module_guards),
    )
    model = LayerwiseModel(make_tiny_model("llama_gqa_tied", dtype=torch.float32))
    forward = passes.ForwardPasses(model, compile=True)
    assert len(filtered) >= 7 and all(filtered)
    assert "guard_filter_fn" in forward._options["options"]


def test_recompile_limit_on_a_torch_without_the_argument(monkeypatch) -> None:
    """Where torch.compile has no recompile_limit (torch 2.11, on the GPU image we were
    lent), the process-wide limit is raised instead of passing an unknown argument."""
    from self_speculation import passes

    def old_compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor",
                    mode=None, options=None, disable=False):  # fmt: skip
        return model

    monkeypatch.setattr(torch, "compile", old_compile)
    before = torch._dynamo.config.recompile_limit
    # dynamo's config is patched its own way (monkeypatch's undo deletes the setting).
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        options = passes.compile_options(torch.device("cuda"))
        assert "recompile_limit" not in options
        assert torch._dynamo.config.recompile_limit == passes.RECOMPILE_LIMIT
        old_compile(lambda x: x, **options)
    assert torch._dynamo.config.recompile_limit == before  # restored, still readable


def test_compiled_few_row_products_go_to_the_kernel() -> None:
    """The compiler pass rewrites linear layers with 2-8 rows (with and without bias), one
    row only for large weights, and leaves wider products to BLAS; results equal eager."""
    layers = torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 16, bias=False)
    )
    large = torch.nn.Linear(512, ONE_ROW_MIN_WEIGHTS // 512, bias=False)
    options = compile_options(torch.device("cpu"))
    rewrite = options["options"]["post_grad_custom_pre_pass"]
    # Compile afresh: a graph from inductor's on-disk cache skips the passes.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        for module, rows, expected in [
            (layers, 1, 0),
            (layers, 6, 2),
            (layers, 12, 0),
            (large, 1, 1),
            (large, 2, 1),
        ]:
            x = torch.randn(1, rows, module[0].in_features if module is layers else 512)
            before = rewrite.replaced
            torch.testing.assert_close(torch.compile(module, **options)(x), module(x))
            assert rewrite.replaced - before == expected, (rows, expected)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama_mha_untied", "qwen2", "phi3", "gemma2_softcap_sliding"])
def test_fast_path_single_prompt_self_speculation_equals_autoregressive(family: str) -> None:
    """One prompt: verification's k + 1 = 4 rows go through the few-row kernel (projections
    with bias, fused qkv, soft-capping and sliding windows), drafts through the fused
    greedy draft pass (every family's batched drafts are checked above)."""
    generator = generator_for(family)
    for prompt in PROMPTS:
        reference = generator.generate(prompt, config("autoregressive", False)).token_ids
        fast = generator.generate(prompt, config("self_speculative", True)).token_ids
        assert fast == reference


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "queries"), [(1, 4, 1, 1), (3, 4, 2, 4), (2, 6, 6, 3)]
)
def test_few_query_attention_equals_sdpa(batch: int, heads: int, kv_heads: int, queries: int):
    """The compiled passes' grouped attention against transformers' sdpa function: grouped
    query heads, left padding, several queries at consecutive columns; eager and compiled."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from self_speculation.attention import few_query_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    generator = torch.Generator().manual_seed(batch * 100 + queries)
    columns = 11
    query = torch.randn(batch, heads, queries, 8, generator=generator)
    key, value = (torch.randn(batch, kv_heads, columns, 8, generator=generator) for _ in "kv")
    # Row r is left-padded by r columns; query i sits at column 6 + i.
    slots = torch.arange(columns)
    at = 6 + torch.arange(queries)[None, None, :, None]
    padding = torch.arange(batch)[:, None, None, None]
    mask = (slots <= at) & (slots >= padding)  # [batch, 1, queries, columns]
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    for function in (few_query_attention, torch.compile(few_query_attention, fullgraph=True)):
        output, weights = function(module, query, key, value, mask, scaling=0.3)
        assert weights is None
        torch.testing.assert_close(output, expected)


def test_few_query_attention_leaves_what_it_does_not_cover_to_sdpa() -> None:
    """Soft-capping is sdpa's to refuse (it raises), not ours to ignore; float masks too."""
    from self_speculation.attention import few_query_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    query, key, value = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="softcap"):
        few_query_attention(module, query, key, value, mask, softcap=30.0)
    # Attention sinks (a tensor per head): passed to sdpa, not tested for truth (it raised).
    output, _ = few_query_attention(module, query, key, value, mask, sinks=torch.zeros(2))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, mask)
    torch.testing.assert_close(output, expected.transpose(1, 2))
    additive = torch.zeros(1, 1, 1, 5)
    output, _ = few_query_attention(module, query, key, value, additive)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, additive)
    torch.testing.assert_close(output, expected.transpose(1, 2))


def test_few_query_attention_is_switched_on_only_around_compiled_calls() -> None:
    """Compiled CPU passes switch sdpa models to the grouped attention for their calls only;
    the eager path and transformers' own forward keep sdpa."""
    from self_speculation.attention import NAME, sdpa_configs, use_few_query_attention

    generator = generator_for("llama_gqa_tied")
    model = generator.layerwise.model
    assert model.config._attn_implementation == "sdpa"
    assert sdpa_configs(model) == [model.config]
    seen = {}
    for compile in (True, False):
        passes = generator._passes(config("autoregressive", compile))
        counted = passes._counted  # every call but a compiled pass's first

        def recording(*args, compile=compile, counted=counted):
            seen[compile] = model.config._attn_implementation
            return counted(*args)

        passes._counted = recording
        try:
            generator.generate(PROMPTS[0], config("autoregressive", compile, max_steps=3))
        finally:
            del passes._counted
    assert seen == {True: NAME, False: "sdpa"}
    assert model.config._attn_implementation == "sdpa"
    with use_few_query_attention(sdpa_configs(model)):
        assert model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"


def test_a_compiled_pass_called_with_unlike_inputs_compiles_again_instead_of_failing() -> None:
    """Inputs that no compiled version of a pass fits (here another dtype; in the wild a
    tensor laid out otherwise) compile a new version rather than failing, and the compile
    is counted as compile time (dynamo's graph counter tells it apart from a plain call)."""
    from self_speculation.passes import ForwardPasses

    passes = ForwardPasses(generator_for("llama_gqa_tied").layerwise, compile=True)
    doubled = torch.compile(lambda x: x * 2 + 1, backend="eager", fullgraph=True)
    first = torch.arange(4, dtype=torch.float32)
    assert torch.equal(passes._timed(("probe",), doubled, first), first * 2 + 1)
    assert torch.equal(passes._timed(("probe",), doubled, first + 1), first * 2 + 3)
    other = torch.arange(4, dtype=torch.int64)
    compiled = passes.compile_seconds
    assert torch.equal(passes._timed(("probe",), doubled, other), other * 2 + 1)
    assert passes.compile_seconds > compiled
    compiled = passes.compile_seconds
    assert torch.equal(passes._timed(("probe",), doubled, other), other * 2 + 1)
    assert passes.compile_seconds == compiled


def test_pass_timing_counts_each_pass_call_when_switched_on() -> None:
    """``ForwardPasses.pass_seconds`` (benchmarks' step breakdown) records one verification
    per self-speculative step and nothing while it is off."""
    generator = generator_for("llama_gqa_tied")
    settings = config("self_speculative", False, max_steps=12)
    passes = generator._passes(settings)
    assert passes.pass_seconds is None
    generator.generate(PROMPTS[0], settings)
    assert passes.pass_seconds is None
    passes.pass_seconds = {}
    try:
        result = generator.generate(PROMPTS[0], settings)
        timed = passes.pass_seconds
    finally:
        passes.pass_seconds = None
    verify = [calls for key, (_, calls) in timed.items() if key[0] == "verify"]
    assert sum(verify) == result.num_steps > 0
    assert all(seconds > 0 and calls > 0 for seconds, calls in timed.values())
    assert {key[0] for key in timed} - {"verify"}  # the drafts were timed too


def test_compile_time_script_times_both_passes_and_refuses_bad_settings(tmp_path) -> None:
    """benchmarks/compile_time.py compiles the autoregressive pass and a greedy step (here
    with dynamo's eager backend: seconds) and prints their times; a bad exit layer is one
    line and exit 2."""
    model = save_tiny_model(tmp_path / "model")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_time.py"
    env = {**os.environ, "LAYERSKIP_COMPILE_BACKEND": "eager"}
    run = [sys.executable, str(script), "--model", str(model), "--num_speculations", "2"]
    finished = subprocess.run(
        [*run, "--exit_layer", "2"], capture_output=True, text=True, timeout=300, env=env
    )
    assert finished.returncode == 0, finished.stderr
    line = finished.stdout.strip()
    assert "autoregressive" in line and "self-speculative (E=2, k=2)" in line
    assert "fell back" not in finished.stderr
    refused = subprocess.run(
        [*run, "--exit_layer", "9"], capture_output=True, text=True, timeout=300, env=env
    )
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "compile_time.py: error: exit_layer must be in [1, 4] for this model, got 9"
    )


@pytest.mark.slow
def test_a_model_moved_to_another_dtype_gets_passes_of_its_own() -> None:
    """A model cast after its generator was built (``model.to(torch.float64)``) decodes with
    passes compiled for its new dtype: the tokens of a fresh generator's eager decoding (the
    pass kept from the first dtype gave one token and a non-finite stop, or failed in the
    few-row kernel); compile time only grows."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    generator.generate_batch(PROMPTS, config("autoregressive", True))
    before = generator.compile_seconds
    generator.draft = None  # drops the passes (they hold the draft exit), not their seconds
    assert generator.compile_seconds == before
    model.to(torch.float64)
    expected = Generator(model, IdTokenizer()).generate_batch(
        PROMPTS, config("autoregressive", False)
    )
    fast = generator.generate_batch(PROMPTS, config("autoregressive", True))
    assert [r.token_ids for r in fast] == [r.token_ids for r in expected]
    assert [r.stop_reason for r in fast] == ["max_steps"] * len(PROMPTS)
    assert generator.compile_seconds > before


@pytest.mark.slow
def test_compiled_generations_of_one_generator_run_one_at_a_time() -> None:
    """Compiled generations share the generator's key/value buffers: threads take turns
    (every thread's tokens are the reference; 19 of 20 were wrong when they ran at once),
    and one started from the running one's streamer is refused in one line (it zeroed the
    outer generation's keys and values: its tokens went wrong, silently)."""
    import threading

    from self_speculation import ConfigError
    from self_speculation.streaming import Streamer

    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    expected = [
        r.token_ids for r in generator.generate_batch(PROMPTS, config("autoregressive", False))
    ]
    fast = config("autoregressive", True)
    generator.generate_batch(PROMPTS, fast)  # compiles
    results: dict[int, list] = {}

    def run(index: int) -> None:
        for _ in range(3):
            results[index] = [r.token_ids for r in generator.generate_batch(PROMPTS, fast)]
            if results[index] != expected:
                return

    threads = [threading.Thread(target=run, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {index: expected for index in range(4)}

    class Nested(Streamer):
        wants_tokens = True

        def on_step(self, *step) -> None:
            generator.generate(PROMPTS[1], fast)

    with pytest.raises(ConfigError, match="cannot start inside another one"):
        generator.generate(PROMPTS[0], fast, streamer=Nested())
    alone = generator.generate(PROMPTS[1], config("autoregressive", False)).token_ids
    inner = []
    eager_inside = Streamer()
    eager_inside.wants_tokens = True  # else on_step, set on the instance, is never called
    eager_inside.on_step = lambda *step: inner.append(
        generator.generate(PROMPTS[1], config("autoregressive", False)).token_ids
    )
    assert generator.generate(PROMPTS[0], fast, streamer=eager_inside).token_ids == expected[0]
    assert inner and all(tokens == alone for tokens in inner)


def test_cuda_graph_state_in_a_worker_thread() -> None:
    """The CUDA fast path's first call in a thread other than the one that imported
    ``cudagraph_trees`` finds that thread's tree container (torch 2.11 failed a bare
    assertion there; the passes set it up as torch 2.13 does). Runs on a CPU: the lookup
    itself needs no device."""
    import threading

    from torch._inductor import cudagraph_trees

    from self_speculation.passes import _cuda_graphs_in_this_thread

    cudagraph_trees.get_container(0)  # this thread's
    found = []

    def worker() -> None:
        _cuda_graphs_in_this_thread()
        found.append(cudagraph_trees.get_container(0))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert len(found) == 1
