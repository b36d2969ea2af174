"""Sampling in one compiled call per step: ``ForwardPasses.sampled_decode_step`` (plain
decoding) and ``counted_sampled_step`` / ``sampled_step`` (self-speculation) warp, draw,
accept and keep the books inside the call, from uniform numbers drawn before each step, as
eager decoding draws them (``TokenSelector.uniforms``): a seed gives the same tokens on
both paths, for batches whose rows finish apart too. The warping and the draw are
transformers' (``warped`` against its warpers) and exact in distribution (``draw``).

Traced with dynamo's eager backend (seconds); tests/test_compiled_sampling.py checks the
compiled path's distribution against the exact one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_one_call_step import PROMPTS, STRATEGIES, _tensor_calls
from tiny_models import make_tiny_model, make_tiny_tokenizer
from torch._dynamo.utils import counters

from self_speculation import GenerationConfig, Generator
from self_speculation.passes import COMPILE_BACKEND_VARIABLE
from self_speculation.sampling import (
    TokenSelector,
    build_logits_processors,
    draw,
    warp_key,
    warped,
    wide_float,
)

WARPS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.6, top_k=0, top_p=0.9),
    dict(temperature=1.3, top_k=5, top_p=1.0),
    dict(temperature=0.7, top_k=50, top_p=0.3),
    dict(temperature=1.0, top_k=1000, top_p=0.001),
]


@pytest.fixture(autouse=True)
def traced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())


@pytest.mark.parametrize("warp", WARPS, ids=str)
def test_warped_is_transformers_warpers(warp: dict) -> None:
    logits = torch.randn(3, 4, 300, generator=torch.Generator().manual_seed(0)) * 4
    logits[0, 0, :7] = 9.0  # ties at the top-k and top-p boundaries
    ours = warped(logits, warp["temperature"], warp["top_k"], warp["top_p"])
    processors = build_logits_processors(GenerationConfig(sample=True, **warp))
    flat = logits.reshape(-1, 300)
    theirs = processors(torch.zeros(len(flat), 0, dtype=torch.long), flat).reshape(logits.shape)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert bool(torch.isfinite(ours).any(dim=-1).all())  # at least one token stays


def test_draw_is_exact_and_never_draws_an_impossible_token() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])
    grid = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000  # evenly spread draws
    counts = torch.bincount(draw(probs.expand(4000, 6), grid.float()), minlength=6)
    assert counts.tolist() == [0, 1000, 0, 2000, 1000, 0]
    edges = torch.tensor([0.0, 0.25, 0.75, 1.0 - 2**-24])
    assert draw(probs.expand(4, 6), edges).tolist() == [1, 3, 4, 4]
    # Unnormalised rows (a residual distribution) draw by their proportions too.
    assert draw(torch.tensor([[0.0, 2.0, 6.0]]), torch.tensor([0.3])).tolist() == [2]


def test_draws_resolve_tokens_below_float32s_grid() -> None:
    """Uniforms are float64: a token of probability 1e-9 (below float32's 2**-24 grid) is
    drawn at its own rate, and the selector's numbers are off that grid."""
    probs = torch.tensor([[0.3, 1e-9, 0.4]])
    cumulative = probs[0].double().cumsum(dim=0)
    inside = (cumulative[:2].mean() / cumulative[-1])[None]  # within the tiny token's share
    assert draw(probs, inside).tolist() == [1]
    # No float32 number lies in that share: its neighbours on float32's grid miss it.
    below = inside.float()
    above = torch.nextafter(below, torch.tensor([1.0]))
    assert draw(probs, below).tolist() != [1] and draw(probs, above).tolist() != [1]
    selector = TokenSelector(GenerationConfig(), torch.Generator().manual_seed(0))
    uniforms = selector.uniforms(1000, device=torch.device("cpu"))
    assert uniforms.dtype == torch.float64
    assert wide_float(torch.device("mps")) == torch.float32  # MPS has no float64
    assert bool((uniforms * 2**24 != (uniforms * 2**24).floor()).any())


def test_draws_are_float32_on_an_xpu_without_float64(monkeypatch) -> None:
    """Intel Arc GPUs have no float64 (an operation in it fails there): draws in float32."""
    from self_speculation import sampling

    for has_fp64, expected in ((False, torch.float32), (True, torch.float64)):
        sampling._xpu_has_float64.cache_clear()
        properties = type("Properties", (), {"has_fp64": has_fp64})()
        monkeypatch.setattr(
            torch.xpu, "get_device_properties", lambda index, found=properties: found
        )
        assert wide_float(torch.device("xpu", 0)) == expected
    sampling._xpu_has_float64.cache_clear()


# The compiled step each strategy runs when sampling, its books inside.
SAMPLED_STEPS = {
    "autoregressive": "sampled_decode_step",
    "self_speculative": "counted_sampled_step",
    "tree": "counted_tree_step",
}


def _summary(results: list) -> list[tuple]:
    return [
        (r.token_ids, r.stop_reason, r.num_steps, r.num_drafted, r.num_accepted) for r in results
    ]


def _seeded(generator: Generator, prompts: list, config: GenerationConfig) -> list[tuple]:
    return _summary(
        generator.generate_batch(prompts, config, generator=torch.Generator().manual_seed(7))
    )


@pytest.mark.parametrize(
    "settings",
    STRATEGIES,
    ids=lambda s: (
        f"{s['generation_strategy']} {s.get('num_speculations', s.get('tree_branching'))}"
    ),
)
def test_sampled_compiled_steps_draw_eager_decodings_tokens(
    generator: Generator, settings: dict
) -> None:
    """A batch whose rows finish apart (stop tokens, limits), with and without finished
    rows leaving it, two warps in one generator (each its own compiled pass: a pass
    compiled for one set of warpers must not serve another): eager decoding's tokens, stop
    reasons, steps and acceptance, for a seed; one compiled pass kind per step."""
    for warp in WARPS[1:3]:
        config = GenerationConfig(sample=True, max_steps=24, **warp, **settings)
        eager = generator.generate_batch(PROMPTS, config)
        stops = sorted({result.token_ids[len(result.token_ids) // 3] for result in eager})[:2]
        config = dataclasses.replace(config, stop_token_ids=stops)
        expected = _seeded(generator, PROMPTS, config)
        compiled = dataclasses.replace(config, compile=True)
        passes = generator._passes(compiled)
        passes.pass_seconds = {}
        try:
            for shed in (True, False):
                generator.shed_finished_rows = shed
                assert _seeded(generator, PROMPTS, compiled) == expected
            kinds = {key[0] for key in passes.pass_seconds}
            warps = {key[-1] for key in passes.pass_seconds}
        finally:
            generator.shed_finished_rows, passes.pass_seconds = True, None
        assert kinds == {SAMPLED_STEPS[settings["generation_strategy"]]}
        assert warps == {warp_key((warp["temperature"], warp["top_k"], warp["top_p"]))}


@pytest.mark.parametrize("strategy", SAMPLED_STEPS)
def test_a_compiled_sampled_step_serves_every_temperature_and_top_p(strategy: str) -> None:
    """The temperature's and top-p's values are a compiled step's inputs: a generator that
    samples at several of them (a server's requests, a sweep over temperatures) compiles
    each step once, and each value draws eager decoding's tokens for a seed (a value
    compiled in as a constant would serve every later call, or compile again for each)."""
    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    settings = next(s for s in STRATEGIES if s["generation_strategy"] == strategy)
    values = [(0.6, 0.9), (1.3, 0.5), (0.35, 0.97)]
    compiles, graphs = [], []
    for temperature, top_p in values:
        config = GenerationConfig(
            sample=True, max_steps=12, temperature=temperature, top_p=top_p, **settings
        )
        expected = _seeded(generator, PROMPTS, config)
        compiled = dataclasses.replace(config, compile=True)
        passes = generator._passes(compiled)
        assert _seeded(generator, PROMPTS, compiled) == expected
        compiles.append(passes._compiles)
        graphs.append(counters["stats"]["unique_graphs"])
    assert {key[0] for key in passes._seen} == {SAMPLED_STEPS[strategy]}
    assert compiles == [1, 1, 1] and graphs[1:] == graphs[:1] * 2
    # The values differ enough to draw other tokens (else equal tokens prove nothing).
    draws = [
        _seeded(generator, PROMPTS, GenerationConfig(sample=True, max_steps=12, temperature=t,
                top_p=p, **settings))
        for t, p in values
    ]  # fmt: skip
    assert draws[0] != draws[1] != draws[2] != draws[0]


def test_adaptive_sampled_chains_run_the_fused_sampled_step(generator: Generator) -> None:
    config = GenerationConfig(
        sample=True, max_steps=16, generation_strategy="adaptive", exit_layer=2,
        num_speculations=2, compile=True,
    )  # fmt: skip
    passes = generator._passes(config)
    passes.pass_seconds = {}
    try:
        results = generator.generate_batch(PROMPTS, config, generator=torch.Generator())
        kinds = {key[0] for key in passes.pass_seconds}
    finally:
        passes.pass_seconds = None
    assert kinds == {"sampled_step"} and all(len(r.token_ids) == 16 for r in results)


@pytest.mark.parametrize("settings", STRATEGIES[:2], ids=lambda s: s["generation_strategy"])
def test_a_sampled_compiled_step_is_one_call(
    generator: Generator, settings: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sampled step is one compiled call, and between two calls the loop runs at most
    three tensor operations: the step's random numbers, the read of its summary, a view of
    its drafts."""
    config = GenerationConfig(sample=True, max_steps=40, compile=True, **settings)
    generator.generate_batch([PROMPTS[0]], config)  # traced here, not counted
    torch.manual_seed(0)  # the default source: text that runs to max_steps both times
    short = _tensor_calls(generator, dataclasses.replace(config, max_steps=6), monkeypatch)
    torch.manual_seed(0)
    long = _tensor_calls(generator, config, monkeypatch)
    steps = long[2] - short[2]
    assert steps > 4
    assert (long[0] - short[0]) / steps <= 3 and (long[1] - short[1]) / steps == 1
