"""Trees at the edges: engine.py compares a sampled tree with the sampled paths, and a node
wider than the vocabulary is refused in one line."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _path(name: str, tokens_per_second: float) -> dict:
    return {
        "name": name,
        "tokens_per_second": tokens_per_second,
        "ms_per_token": 1e3 / tokens_per_second,
        "compile_or_first_call_seconds": 0.0,
        "peak_memory_bytes": None,
        "identical_to_first_path": None,
    }


def test_engine_compares_a_sampled_tree_with_the_sampled_paths(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """engine.py --sampled --trees: a sampled tree's ratios are to its kind's sampled
    autoregressive and self-speculative paths (sampling is slower per token), never to the
    greedy ones."""
    monkeypatch.syspath_prepend(str(_BENCHMARKS))
    engine = importlib.import_module("engine")
    speeds = {
        "ours eager autoregressive": 100.0,
        "ours eager self_speculative": 200.0,
        "ours eager tree 2,1": 150.0,
        "ours eager autoregressive sampled": 40.0,
        "ours eager self_speculative sampled": 50.0,
        "ours eager tree 2,1 sampled": 60.0,
    }
    document = {
        "floor_ms_per_token": 1.0,
        "paths": [_path(name, speed) for name, speed in speeds.items()],
        "environment": {},
    }
    engine.print_table(document)
    lines = capsys.readouterr().out.splitlines()
    sampled = [line for line in lines if line.startswith("ours eager tree 2,1 sampled / ")]
    assert sampled == [
        "ours eager tree 2,1 sampled / ours eager autoregressive sampled: 1.50x",
        "ours eager tree 2,1 sampled / ours eager self_speculative sampled: 1.20x",
    ]
    assert "ours eager tree 2,1 / ours eager autoregressive: 1.50x" in lines


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_a_node_wider_than_the_vocabulary_is_refused_in_one_line(sample: bool) -> None:
    """A node's children are distinct tokens: a branching wider than the vocabulary (12
    tokens here) is a ConfigError naming it, not torch's "selected index k out of range"
    from the middle of the first tree step."""
    from test_sampling_distribution import VOCAB, tiny_generator

    from self_speculation import ConfigError, GenerationConfig

    generator = tiny_generator()
    config = GenerationConfig(
        max_steps=6,
        sample=sample,
        generation_strategy="tree",
        exit_layer=1,
        tree_branching=[VOCAB + 1, 1],
    )
    with pytest.raises(ConfigError, match=f"at most {VOCAB} children"):
        generator.generate([3, 1, 4], config)
    # As wide as the vocabulary: every token a child.
    wide = GenerationConfig(
        max_steps=6, sample=sample, generation_strategy="tree", exit_layer=1, tree_branching=[VOCAB]
    )
    assert len(generator.generate([3, 1, 4], wide).token_ids) == 6
