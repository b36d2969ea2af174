"""The engine on CUDA (``pytest -m gpu``; skipped where there is no CUDA device).

The fast path on CUDA compiles with CUDA graphs (inductor's ``triton.cudagraphs``): no graph
is skipped (inductor's ``cudagraph_skips`` counter: a mutated non-static input, a CPU op,
...) over a batch whose rows finish apart, its second run replays captured graphs, and for
two families and each strategy the tokens equal eager decoding's, also on a second batch of
other prompt lengths. ``benchmarks/gpu_check.sh`` runs them (without trees and adaptive).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model
from torch._dynamo.utils import counters

from self_speculation import GenerationConfig, Generator, model_surgery

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[5, 7, 9, 11, 13], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]


def config(strategy: str, compile: bool, **overrides) -> GenerationConfig:
    settings = dict(max_steps=24, sample=False, generation_strategy=strategy, compile=compile)
    if strategy in ("self_speculative", "tree", "adaptive"):
        settings.update(exit_layer=2, num_speculations=3)
    return GenerationConfig(**{**settings, **overrides})


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_cuda_graphs_are_captured_and_replayed(strategy: str, monkeypatch) -> None:
    """Zero CUDA-graph skips over warm-up and generation of a batch whose rows finish apart
    (a stop token ends one row early, so the batch shrinks), graph replays counted on the
    second run of the same batch, tokens equal eager decoding. First in the file: the GPU
    check runs these before anything else."""
    from torch._inductor import cudagraph_trees

    replays = []
    run_graph = cudagraph_trees.CUDAGraphNode.run_graph

    def counting(node) -> None:
        replays.append(node)
        run_graph(node)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphNode, "run_graph", counting)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32).to("cuda")
    generator = Generator(model, IdTokenizer())
    free = generator.generate_batch(PROMPTS, config(strategy, False))
    stop = free[1].token_ids[5]  # ends row 1 early
    eager = generator.generate_batch(PROMPTS, config(strategy, False, stop_token_ids=[stop]))
    assert len({r.num_steps for r in eager}) > 1  # the rows finish apart
    fast = config(strategy, True, stop_token_ids=[stop])
    skips = counters["inductor"]["cudagraph_skips"]
    generator.generate_batch(PROMPTS, fast)  # compiles and captures every shape it meets
    replays.clear()
    again = generator.generate_batch(PROMPTS, fast)
    assert [r.token_ids for r in again] == [r.token_ids for r in eager]
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert len(replays) > 0


# Each case compiles its passes (about 20 s each on an H200): two families, each strategy once.
@pytest.mark.parametrize(
    ("family", "strategy"),
    [
        ("llama_gqa_tied", "self_speculative"),
        ("qwen2", "autoregressive"),
        ("qwen2", "tree"),
        ("llama_gqa_tied", "adaptive"),
    ],
)
def test_cuda_fast_path_equals_eager_and_replays(family: str, strategy: str) -> None:
    model = make_tiny_model(family, dtype=torch.float32).to("cuda")
    generator = Generator(model, IdTokenizer())
    reference = [
        r.token_ids for r in generator.generate_batch(PROMPTS, config("autoregressive", False))
    ]
    fast = generator.generate_batch(PROMPTS, config(strategy, True))
    assert [r.token_ids for r in fast] == reference
    # Replay: other prompt lengths, the same compiled (and captured) passes.
    others = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [6], [7, 7]]
    eager = [r.token_ids for r in generator.generate_batch(others, config(strategy, False))]
    assert [r.token_ids for r in generator.generate_batch(others, config(strategy, True))] == eager


def test_cuda_sampled_fast_path_draws_eager_tokens_at_every_temperature(
    device: str = "cuda",
) -> None:
    """Sampled self-speculation (the original README's ``--sample True``) in one captured
    graph per step: a seed draws eager decoding's tokens, no CUDA graph is skipped, and a
    second temperature and top-p run the same compiled step (their values are graph inputs,
    ``sampling.warp_inputs``), drawing eager's tokens too."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).to(device)
    generator = Generator(model, IdTokenizer())
    skips = counters["inductor"]["cudagraph_skips"]
    compiles = []
    for temperature, top_p in ((0.6, 0.9), (1.2, 0.5)):
        settings = dict(sample=True, temperature=temperature, top_p=top_p)
        eager = generator.generate_batch(
            PROMPTS, config("self_speculative", False, **settings),
            generator=torch.Generator(device).manual_seed(5),
        )  # fmt: skip
        fast_config = config("self_speculative", True, **settings)
        fast = generator.generate_batch(
            PROMPTS, fast_config, generator=torch.Generator(device).manual_seed(5)
        )
        assert [r.token_ids for r in fast] == [r.token_ids for r in eager]
        compiles.append(generator._passes(fast_config)._compiles)
    assert compiles[0] >= 1 and compiles[1] == compiles[0]
    assert counters["inductor"]["cudagraph_skips"] == skips


def test_cuda_layer_regions_equal_eager_without_skipped_graphs(
    monkeypatch: pytest.MonkeyPatch, device: str = "cuda"
) -> None:
    """Each decoder layer traced once and called per layer (LAYERSKIP_LAYER_REGIONS=1,
    ``nested_compile_region``; not the default until this has passed on a GPU): both
    strategies' tokens equal eager decoding's for a batch, and no CUDA graph is skipped.
    Last in the file: the GPU check's clock cuts it first. (tests/test_layer_regions.py
    runs it on the CPU.)"""
    monkeypatch.setattr(model_surgery, "_REGIONS_SETTING", "1")
    assert model_surgery.layer_regions()
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).to(device)
    generator = Generator(model, IdTokenizer())
    skips = counters["inductor"]["cudagraph_skips"]
    for strategy in ("autoregressive", "self_speculative"):
        eager = generator.generate_batch(PROMPTS, config(strategy, False))
        fast = generator.generate_batch(PROMPTS, config(strategy, True))
        assert [r.token_ids for r in fast] == [r.token_ids for r in eager]
        assert generator.fast_path_fallback(config(strategy, True)) is None
    assert counters["inductor"]["cudagraph_skips"] == skips
