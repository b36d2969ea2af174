"""Token trees drafted from the early exit (the ``tree`` strategy): greedy output identical
to autoregressive decoding on every family, batched and single, eager and compiled, with
the cache after each step equal to a fresh pass over the kept tokens."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import FAMILIES, IdTokenizer, make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator
from self_speculation.errors import ConfigError
from self_speculation.passes import ForwardPasses
from self_speculation.strategies import TreeGenerationStrategy
from self_speculation.trees import TokenTree, default_branching, tree_accept

NUM_LAYERS = 4
PROMPTS = [[5], [5, 60, 7, 200, 31], [9, 8, 7]]
BRANCHINGS = [[2], [2, 2, 1], [3, 1, 2]]


@functools.cache
def generator_for(family: str) -> Generator:
    return Generator(make_tiny_model(family), make_tiny_tokenizer())


def greedy(max_steps: int = 24, **settings) -> GenerationConfig:
    return GenerationConfig(max_steps=max_steps, sample=False, **settings)


def tree(exit_layer: int, branching: list[int] | None = None, **settings) -> GenerationConfig:
    return greedy(
        generation_strategy="tree", exit_layer=exit_layer, tree_branching=branching, **settings
    )


def test_tree_shape_breadth_first() -> None:
    shape = TokenTree((2, 2, 1))
    assert shape.sizes == (1, 2, 4, 4) and shape.num_nodes == 11 and shape.depth == 3
    assert shape.starts == (0, 1, 3, 7)
    assert shape.parents == (-1, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6)
    ancestors = shape.ancestors(torch.device("cpu"))
    # Node 9 (depth 3) descends from 5 (depth 2), 2 (depth 1) and the root.
    assert ancestors[9].nonzero().flatten().tolist() == [0, 2, 5, 9]
    assert shape.depths(torch.device("cpu")).tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert default_branching(4) == (2, 2, 1, 1) and default_branching(1) == (2,)


def test_tree_accept_follows_the_matching_branch() -> None:
    shape = TokenTree((2, 2))  # root 0; depth 1: nodes 1, 2; depth 2: 3, 4 (of 1), 5, 6 (of 2)
    tokens = torch.tensor(
        [
            [9, 10, 11, 20, 21, 22, 23],  # row 0: the second child, then its first child
            [9, 10, 11, 20, 21, 22, 23],  # row 1: nothing matches at depth 1
            [9, 10, 11, 20, 21, 22, 23],  # row 2: the first child, then its second child
        ]
    )
    targets = torch.tensor(
        [
            [11, 0, 22, 0, 0, 7, 0],  # after the root: 11 (node 2); after node 2: 22 (node 5)
            [12, 0, 0, 0, 0, 0, 0],
            [10, 21, 0, 0, 5, 0, 0],  # 10 (node 1), 21 (node 4), then 5 after node 4
        ]
    )
    accepted, next_tokens, path, drafts = tree_accept(shape, tokens, targets)
    assert accepted.tolist() == [2, 0, 2]
    assert next_tokens.tolist() == [7, 12, 5]
    assert path[0].tolist() == [2, 5] and path[2].tolist() == [1, 4]
    # A rejected row reports the most likely children from the root on (a chain's drafts).
    assert path[1].tolist() == [1, 3] and drafts[1].tolist() == [10, 20]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tree_decoding_matches_autoregressive(family: str) -> None:
    generator = generator_for(family)
    for prompt in PROMPTS[:2]:
        reference = generator.generate(prompt, greedy()).token_ids
        assert len(reference) == 24
        for exit_layer in range(1, NUM_LAYERS + 1):
            for branching in BRANCHINGS:
                result = generator.generate(prompt, tree(exit_layer, branching))
                assert result.token_ids == reference, (prompt, exit_layer, branching)


def test_exit_at_the_last_layer_accepts_the_whole_depth_every_step() -> None:
    generator = generator_for("llama_mha_untied")
    reference = generator.generate([5, 6], greedy(40)).token_ids
    result = generator.generate([5, 6], tree(NUM_LAYERS, [2, 2, 1, 1, 1], max_steps=40))
    assert result.token_ids == reference
    assert result.acceptance_rate == 1.0
    assert result.num_steps == 7  # 39 tokens after the prompt's pass, 6 per step


@pytest.mark.parametrize("family", ["llama_mha_untied", "qwen2_sliding", "gemma2_softcap_sliding"])
def test_batched_tree_rows_equal_their_single_runs(family: str) -> None:
    generator = generator_for(family)
    singles = [generator.generate(prompt, greedy()).token_ids for prompt in PROMPTS]
    for exit_layer in (1, 2, 3):
        for branching in ([2, 2, 1], [3, 1]):
            results = generator.generate_batch(PROMPTS, tree(exit_layer, branching))
            assert [r.token_ids for r in results] == singles, (exit_layer, branching)


def test_batched_tree_rows_stop_on_their_own() -> None:
    generator = generator_for("llama_mha_untied")
    free_runs = [generator.generate(prompt, greedy(30)).token_ids for prompt in PROMPTS]
    eos = free_runs[1][4]
    settings = dict(max_steps=30, stop_token_ids=[eos])
    singles = [generator.generate(p, greedy(**settings)) for p in PROMPTS]
    results = generator.generate_batch(PROMPTS, tree(2, [2, 2], **settings))
    assert [r.token_ids for r in results] == [s.token_ids for s in singles]
    assert [r.stop_reason for r in results] == [s.stop_reason for s in singles]


@pytest.mark.parametrize("max_steps", [1, 2, 3])
def test_max_steps_below_the_tree_depth_is_exact(max_steps: int) -> None:
    generator = generator_for("qwen2")
    reference = generator.generate([5, 6], greedy(max_steps)).token_ids
    for exit_layer in (1, 4):
        result = generator.generate([5, 6], tree(exit_layer, [2, 2, 2, 1], max_steps=max_steps))
        assert result.token_ids == reference and result.stop_reason == "max_steps"


def test_cache_after_every_tree_step_equals_a_fresh_prefill(monkeypatch) -> None:
    """The accepted path's columns move behind the root: every layer's keys and values
    before each row's pending column are those of a fresh pass over the kept tokens, also
    after steps that accepted a second- or third-ranked branch."""
    from test_equivalence import assert_cache_equals_a_fresh_prefill

    import self_speculation.passes as passes_module

    generator = generator_for("qwen2")
    passes = ForwardPasses(generator.layerwise)
    side_branches = []
    accept = passes_module.tree_accept

    def counting_accept(shape, tokens, targets):
        accepted, next_tokens, path, drafts = accept(shape, tokens, targets)
        depth = torch.arange(shape.depth)
        first_children = torch.tensor(shape.starts[1:])  # a rank-0 node of each depth
        on_path = depth[None] < accepted[:, None]
        side_branches.append(int(((path != first_children) & on_path).any()))
        return accepted, next_tokens, path, drafts

    checked = []
    original_step = TreeGenerationStrategy.step

    def checked_step(self, state, num_drafts, active):
        result = original_step(self, state, num_drafts, active)
        checked.extend(assert_cache_equals_a_fresh_prefill(generator, passes, state))
        return result

    monkeypatch.setattr(passes_module, "tree_accept", counting_accept)
    monkeypatch.setattr(TreeGenerationStrategy, "step", checked_step)
    reference = [generator.generate(p, greedy(40)).token_ids for p in PROMPTS[1:]]
    results = generator.generate_batch(PROMPTS[1:], tree(3, [3, 3, 1], max_steps=40))
    assert [r.token_ids for r in results] == reference
    assert len(checked) >= sum(r.num_steps for r in results)
    assert any(side_branches)  # the check covered moved paths, not only rank-0 chains


@pytest.mark.parametrize("family", ["llama_gqa_tied", "gemma2_softcap_sliding"])
def test_trees_with_an_exit_adapter_or_a_draft_vocabulary_match_autoregressive(
    family: str,
) -> None:
    """Draft exits: an adapter (its own attention over the cache, which the tree's mask
    and the path's move must cover) and a reduced draft vocabulary."""
    from test_draft_exit import draft_exits

    generator = Generator(make_tiny_model(family), make_tiny_tokenizer())
    reference = [r.token_ids for r in generator.generate_batch(PROMPTS, greedy())]
    for name, draft in draft_exits(generator).items():
        generator.draft = draft
        for branching in ([2, 2, 1], [1, 1]):
            batch = generator.generate_batch(PROMPTS, tree(2, branching))
            assert [r.token_ids for r in batch] == reference, (name, branching)
        alone = generator.generate(PROMPTS[1], tree(2, [3, 2]))
        assert alone.token_ids == reference[1], name


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sample=False, no_repeat_ngram_size=2), "logits processors"),
        (dict(sample=False, draft_confidence_threshold=0.5), "draft_confidence_threshold"),
    ],
)
def test_settings_that_need_chains_are_refused(settings: dict, message: str) -> None:
    """A tree cannot keep them exact: refused in one line, pointing at chains, rather than
    decoded as chains under the tree's name."""
    with pytest.raises(ConfigError, match=f"{message}.*use 'self_speculative'"):
        GenerationConfig(generation_strategy="tree", exit_layer=2, **settings)


def test_a_checkpoints_own_logits_processors_are_refused_too() -> None:
    generator = generator_for("llama_mha_untied")
    checkpoint = generator.model.generation_config
    before, checkpoint.repetition_penalty = checkpoint.repetition_penalty, 1.3
    try:
        with pytest.raises(ConfigError, match="logits processors"):
            generator.generate([5, 6], tree(2, [2, 1]))
    finally:
        checkpoint.repetition_penalty = before


def test_tree_branching_is_refused_for_other_strategies() -> None:
    for strategy in ("self_speculative", "adaptive", "autoregressive"):
        with pytest.raises(ConfigError, match="tree_branching is for generation_strategy 'tree'"):
            GenerationConfig(generation_strategy=strategy, sample=False, tree_branching=[2, 2])


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(tree_branching=[]), "at least one depth"),
        (dict(tree_branching=[2, 0]), "must be >= 1"),
        (dict(tree_branching=[4, 4, 4]), "more than 64 nodes"),
        (dict(tree_branching=[2, 2], num_speculations=3), "2 deep, but num_speculations is 3"),
    ],
)
def test_bad_tree_settings_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(generation_strategy="tree", sample=False, **settings)


def test_depth_comes_from_num_speculations_without_a_branching() -> None:
    generator = generator_for("qwen2")
    result = generator.generate([5, 6], tree(2, None, num_speculations=4))
    assert result.num_speculations == 4
    assert result.token_ids == generator.generate([5, 6], greedy()).token_ids


@pytest.mark.slow
def test_compiled_trees_equal_eager_and_compile_once() -> None:
    """The fast path: one compiled call per tree step, the eager tokens, batched and
    single, and no recompilation for other prompt lengths."""
    from torch._dynamo.utils import counters

    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    prompts = [[5, 7, 9, 11, 13], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]
    eager = generator.generate_batch(prompts, tree(2, [2, 2, 1], max_steps=16))
    fast = generator.generate_batch(prompts, tree(2, [2, 2, 1], max_steps=16, compile=True))
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]
    graphs = counters["stats"]["unique_graphs"]
    again = generator.generate_batch(
        [[1, 2, 3, 4, 5, 6, 7], [6], [7, 7]], tree(2, [2, 2, 1], max_steps=16, compile=True)
    )
    assert counters["stats"]["unique_graphs"] == graphs
    assert [r.token_ids for r in again] == [
        r.token_ids
        for r in generator.generate_batch(
            [[1, 2, 3, 4, 5, 6, 7], [6], [7, 7]], tree(2, [2, 2, 1], max_steps=16)
        )
    ]
