"""The fast path (compiled passes over the column cache) gives the eager path's tokens and
compiles once per (batch size, exit layer, k), never again during or across generations.

Compiled in float32: the CPU's compiled kernels are the ones users run. Each compile of
a tiny model takes seconds to tens of seconds, so the checks share compiled generators.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import FAMILIES, IdTokenizer, make_tiny_model
from torch._dynamo.utils import counters

from self_speculation import GenerationConfig, Generator
from self_speculation.cpu_kernels import MAX_ROWS, load_few_row_kernel
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


def test_compiled_few_row_products_go_to_the_kernel() -> None:
    """The compiler pass rewrites linear layers with 2-8 rows (with and without bias) and
    leaves wider products to BLAS; results equal the eager layers."""
    layers = torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.SiLU(), torch.nn.Linear(40, 16, bias=False)
    )
    options = compile_options(torch.device("cpu"))
    rewrite = options["options"]["post_grad_custom_post_pass"]
    compiled = torch.compile(layers, **options)
    # Compile afresh: a graph from inductor's on-disk cache skips the passes.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        for rows in (6, 12):
            x = torch.randn(1, rows, 24)
            before = rewrite.replaced
            torch.testing.assert_close(compiled(x), layers(x))
            assert rewrite.replaced - before == (2 if rows <= MAX_ROWS else 0)


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
