"""The ``adaptive`` strategy: chains whose length each step follows the rows' recent
acceptance. The policy's choices, greedy output identical to autoregressive decoding on
every family (batched, single, compiled), and sampling that keeps the target distribution."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_equivalence import generator_for, greedy
from test_sampling_distribution import WARPERS, assert_matches, exact_joint, tiny_generator
from tiny_models import FAMILIES, IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.adaptive import (
    DraftPolicy,
    check_lengths,
    default_lengths,
    expected_tokens,
    step_cost,
)
from self_speculation.errors import ConfigError
from self_speculation.strategies import AdaptiveGenerationStrategy

PROMPTS = [[5], [5, 60, 7, 200, 31], [9, 8, 7]]


def adaptive(exit_layer: int, k: int, **settings) -> GenerationConfig:
    return greedy(
        generation_strategy="adaptive", exit_layer=exit_layer, num_speculations=k, **settings
    )


def policy(batch_size: int = 1, lengths=(1, 2, 4, 8), exits=(6,)) -> DraftPolicy:
    return DraftPolicy(exits, lengths, 16, head=1.4, row_cost=0.1, batch_size=batch_size)


def test_lengths_and_expected_tokens() -> None:
    assert default_lengths(8) == (1, 2, 4, 8)
    assert default_lengths(6) == (1, 2, 4, 6)
    assert default_lengths(3) == (1, 2, 3) and default_lengths(1) == (1,)
    a = torch.tensor([0.0, 0.5, 1.0])
    # a = 0: the correction only; a = 1: every draft and the bonus token.
    assert expected_tokens(a, 3).tolist() == pytest.approx([1.0, 1.875, 4.0], rel=1e-4)
    # Cost: 2 drafts through 6 layers + head, the last through 6, 3 rows through 10 + head.
    assert step_cost(2, 6, 16, 1.4, 0.1) == pytest.approx(2 * 7.4 + 6 + 11.4 * 1.2)
    for bad in ([], [0], [2, -1]):
        with pytest.raises(ConfigError):
            check_lengths(bad)


def test_high_acceptance_drafts_long_and_rejections_draft_short() -> None:
    lengths = policy()
    everything = torch.tensor([True])
    for _ in range(20):  # every draft accepted
        exit_layer, length = lengths.choose(everything)
        lengths.update(exit_layer, length, torch.tensor([length]), everything)
    assert lengths.choose(everything) == (6, 8)
    for _ in range(20):  # the first draft rejected every time
        exit_layer, length = lengths.choose(everything)
        lengths.update(exit_layer, length, torch.tensor([0]), everything)
    assert lengths.choose(everything) == (6, 1)


def test_rows_keep_their_own_statistics() -> None:
    lengths = policy(batch_size=3)
    active = torch.tensor([True, True, False])
    for _ in range(5):
        lengths.update(6, 4, torch.tensor([4, 0, 4]), active)
    acceptance = lengths.acceptance()[:, 0]
    assert acceptance[0] > 0.9 and acceptance[1] < 0.2
    assert acceptance[2] == pytest.approx(0.6)  # inactive: still the prior
    # Alone, the sure row drafts long and the unsure one short; the batch follows the sum.
    assert lengths.choose(torch.tensor([True, False, False])) == (6, 8)
    assert lengths.choose(torch.tensor([False, True, False])) == (6, 1)
    lengths.select_rows(torch.tensor([1]))
    assert lengths.choose() == (6, 1) and lengths.acceptance().shape == (1, 1)


def test_exits_keep_their_own_statistics() -> None:
    """An exit never drafted from keeps the prior; a cheap exit that keeps failing gives
    way to a deeper one that keeps being accepted."""
    choices = policy(exits=(3, 6))
    everything = torch.tensor([True])
    # At the prior the cheaper exit comes first.
    assert choices.choose(everything)[0] == 3
    for _ in range(10):
        choices.update(3, 2, torch.tensor([0]), everything)
    assert choices.choose(everything)[0] == 6
    for _ in range(10):
        choices.update(6, 4, torch.tensor([4]), everything)
    assert choices.acceptance()[0, 0] < 0.1 and choices.acceptance()[0, 1] > 0.9
    assert choices.choose(everything)[0] == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_adaptive_decoding_matches_autoregressive(family: str) -> None:
    generator = generator_for(family)
    for prompt in PROMPTS[:2]:
        reference = generator.generate(prompt, greedy()).token_ids
        for exit_layer in (1, 2, 3, 4):
            for k in (1, 3, 8):
                result = generator.generate(prompt, adaptive(exit_layer, k))
                assert result.token_ids == reference, (prompt, exit_layer, k)


def test_the_length_changes_during_a_generation(monkeypatch) -> None:
    """Exact while the length switches between steps."""
    generator = generator_for("llama_mha_untied")
    chosen: list[int] = []
    original = DraftPolicy.choose

    def recording(self, active=None):
        exit_layer, length = original(self, active)
        chosen.append(length)
        return exit_layer, length

    monkeypatch.setattr(DraftPolicy, "choose", recording)
    reference = generator.generate([5, 6], greedy(60)).token_ids
    switched = 0
    for exit_layer in (1, 2, 3):
        chosen.clear()
        result = generator.generate([5, 6], adaptive(exit_layer, 8, max_steps=60))
        assert result.token_ids == reference, exit_layer
        # Each step drafted the chosen length (the last one may be cut by max_steps).
        assert sum(chosen[:-1]) < result.num_drafted <= sum(chosen)
        switched += len(set(chosen)) > 1
    assert switched


@pytest.mark.parametrize("family", ["llama_mha_untied", "qwen2_sliding"])
def test_batched_adaptive_rows_equal_their_single_runs_and_stop_on_their_own(
    family: str,
) -> None:
    generator = generator_for(family)
    free_runs = [generator.generate(prompt, greedy(30)).token_ids for prompt in PROMPTS]
    eos = free_runs[1][4]
    settings = dict(max_steps=30, stop_token_ids=[eos])
    singles = [generator.generate(p, greedy(**settings)) for p in PROMPTS]
    for exit_layer in (1, 3):
        results = generator.generate_batch(PROMPTS, adaptive(exit_layer, 4, **settings))
        assert [r.token_ids for r in results] == [s.token_ids for s in singles]
        assert [r.stop_reason for r in results] == [s.stop_reason for s in singles]


@pytest.mark.parametrize("max_steps", [1, 2, 3, 5])
def test_max_steps_below_the_longest_chain_is_exact(max_steps: int) -> None:
    generator = generator_for("qwen2")
    reference = generator.generate([5, 6, 7], greedy(max_steps)).token_ids
    result = generator.generate([5, 6, 7], adaptive(4, 8, max_steps=max_steps))
    assert result.token_ids == reference and len(result.token_ids) == max_steps


def test_compiled_adaptive_equals_eager_and_compiles_each_length_once() -> None:
    from torch._dynamo.utils import counters

    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    prompts = [[5, 7, 9, 11, 13], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]
    eager = generator.generate_batch(prompts, adaptive(2, 4, max_steps=24))
    # A generation of two steps compiles every length (none compiles later, mid-run).
    generator.generate_batch(prompts, adaptive(2, 4, max_steps=3, compile=True))
    graphs = counters["stats"]["unique_graphs"]
    fast = generator.generate_batch(prompts, adaptive(2, 4, max_steps=24, compile=True))
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]
    again = generator.generate_batch(prompts[::-1], adaptive(2, 4, max_steps=24, compile=True))
    assert counters["stats"]["unique_graphs"] == graphs
    assert [r.token_ids for r in again] == [r.token_ids for r in eager[::-1]]


def test_strategy_compiles_one_shape_per_length() -> None:
    generator = generator_for("llama_mha_untied")
    strategy = generator._strategy(generator.resolve(adaptive(2, 6)), None)
    assert isinstance(strategy, AdaptiveGenerationStrategy)
    assert sorted(strategy.chains) == [(2, 1), (2, 2), (2, 4), (2, 6)]
    # Eager: a drafting and a verification pass per length (k + 1 verified positions).
    keys = strategy.pass_keys(3)
    assert sorted(key[-1] for key in keys if key[0] == "verify") == [2, 3, 5, 7]


@pytest.mark.slow
def test_sampled_adaptive_decoding_keeps_the_target_distribution() -> None:
    """The length of a step depends on earlier steps only, so each chain step's acceptance
    rule keeps p: 1000 seeded draws, joint of the first 4 tokens (several steps, lengths
    chosen from the prior and then from what was accepted)."""
    generator = tiny_generator()  # 12-token vocabulary, exit 1 far from the last layer
    prompt, length = [3, 1, 4], 4
    exact = exact_joint(generator.model, prompt, length)
    config = GenerationConfig(
        max_steps=length + 1,
        sample=True,
        generation_strategy="adaptive",
        exit_layer=1,
        num_speculations=3,
        **WARPERS,
    )
    rng = torch.Generator().manual_seed(3)
    counts = torch.zeros([exact.shape[0]] * length, dtype=torch.float64)
    drafted = accepted = 0
    for _ in range(1000):
        result = generator.generate(prompt, config, generator=rng)
        counts[tuple(result.token_ids[:length])] += 1
        drafted += result.num_drafted
        accepted += result.num_accepted
    assert 0.05 < accepted / drafted < 0.95
    assert_matches(counts / 1000, exact, 1000, "adaptive")


@pytest.mark.parametrize("family", FAMILIES)
def test_switching_exits_between_steps_matches_autoregressive(family: str, monkeypatch) -> None:
    """Each step may draft from another exit: the cache stays exact (drafting fills layers
    [0, E) of its columns, verification [E, L) from the pending token on, whatever E was
    the step before)."""
    generator = generator_for(family)
    exits: list[int] = []
    original = DraftPolicy.choose

    def alternating(self, active=None):
        _, length = original(self, active)
        exits.append(self.exit_layers[len(exits) % len(self.exit_layers)])
        return exits[-1], length

    monkeypatch.setattr(DraftPolicy, "choose", alternating)
    for prompt in PROMPTS[:2]:
        reference = generator.generate(prompt, greedy(30)).token_ids
        config = adaptive(2, 3, max_steps=30, adaptive_exit_layers=[1, 3, 4])
        assert generator.generate(prompt, config).token_ids == reference, prompt
        batch = generator.generate_batch(PROMPTS, config)
        assert batch[PROMPTS.index(prompt)].token_ids == reference
    assert set(exits) == {1, 2, 3, 4}


def test_adaptive_exits_compiled_equal_eager() -> None:
    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    prompts = [[5, 7, 9, 11, 13], [3, 4]]
    settings = dict(max_steps=20, adaptive_exit_layers=[1, 3])
    eager = generator.generate_batch(prompts, adaptive(2, 2, **settings))
    fast = generator.generate_batch(prompts, adaptive(2, 2, compile=True, **settings))
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(generation_strategy="self_speculative", adaptive_exit_layers=[3]), "is for"),
        (dict(generation_strategy="adaptive", adaptive_exit_layers=[0]), ">= 1"),
        (dict(generation_strategy="adaptive", adaptive_exit_layers=[9]), r"in \[1, 4\]"),
    ],
)
def test_bad_adaptive_exit_layers_are_refused(settings: dict, message: str) -> None:
    generator = generator_for("llama_mha_untied")
    with pytest.raises(ConfigError, match=message):
        generator.generate([5], greedy(exit_layer=2, num_speculations=2, **settings))


def used_exits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The exit sets of every DraftPolicy built from now on."""
    built: list[tuple[int, ...]] = []
    original = DraftPolicy.__init__

    def recording(self, exit_layers, *args, **kwargs):
        built.append(tuple(exit_layers))
        original(self, exit_layers, *args, **kwargs)

    monkeypatch.setattr(DraftPolicy, "__init__", recording)
    return built


def test_scripts_use_the_adaptive_exits_and_compare_with_plain_decoding(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate --compare_autoregressive, correctness and sweep (beside self_speculative)
    build their autoregressive baselines without the adaptive-only flag, and the adaptive
    runs draft from every exit given."""
    built = used_exits(monkeypatch)
    common = ["--model", str(tiny_model_dir), "--generation_strategy", "adaptive",
              "--exit_layer", "2", "--num_speculations", "3", "--adaptive_exit_layers", "1", "3",
              "--max_steps", "12"]  # fmt: skip
    generate = importlib.import_module("generate")
    argv = [*common, "--prompt", "def f(x):", "--sample", "False", "--streamer", "none"]
    assert generate.main([*argv, "--compare_autoregressive", "True",
                          "--output_dir", str(tmp_path / "g")]) == 0  # fmt: skip
    correctness = importlib.import_module("correctness")
    data = ["--dataset", "custom_jsonl", "--data_path", str(prompts_file)]
    assert correctness.main([*common, *data, "--output_dir", str(tmp_path / "c")]) == 0
    assert set(built) == {(1, 2, 3)}
    built.clear()
    sweep = importlib.import_module("sweep")
    grid = ["--exit_layer_first", "2", "--exit_layer_last", "2", "--num_speculations_first",
            "2", "--num_speculations_last", "2", "--sample", "False"]  # fmt: skip
    both = [*common[:2], "--generation_strategy", "self_speculative,adaptive", *common[4:]]
    assert sweep.main([*both, *data, *grid, "--output_dir", str(tmp_path / "s")]) == 0
    assert built and set(built) == {(1, 2, 3)}


@pytest.mark.parametrize(
    "arguments",
    [["--trees", "x"], ["--trees", "2,0"], ["--adaptive_exit_sets", "5,a"], ["--row_cost", "-1"]],
)
def test_drafting_bound_refuses_bad_settings_in_one_line(arguments: list[str]) -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "drafting_bound.py"
    finished = subprocess.run(
        [sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    assert finished.stderr.strip().splitlines()[-1].startswith("drafting_bound.py: error:")
