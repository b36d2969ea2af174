"""Aggregations the metric tests left free to be wrong: NaN figures, completions cut at the
first stop sequence, speedups of strategies that generate different lengths, mismatches
counted per sample, the learning-rate schedule's values."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer, save_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator
from self_speculation.benchmarking import check_prompts, compare_strategies, generate_rows
from self_speculation.metrics import summarize_speed, summarize_text, truncate_completion
from self_speculation.output_safety import replaced_when_done
from self_speculation.training.loop import lr_factor

Sample = dataclasses.make_dataclass("Sample", ["index", "input", "output"])


def test_nan_figures_are_left_out_of_the_means() -> None:
    speed = summarize_speed(
        [
            {"acceptance_rate": math.nan, "total_time": 1.0, "num_generated_tokens": 1},
            {"acceptance_rate": 0.25, "total_time": 1.0, "num_generated_tokens": 1},
        ]
    )
    assert speed["acceptance_rate"] == 0.25
    text = summarize_text(
        [
            {"prediction": "a", "reference": "a", "rouge1": math.nan},
            {"prediction": "a", "reference": "a", "rouge1": 0.5},
        ]
    )
    assert text["rouge1"] == 0.5


def test_a_completion_is_cut_at_its_first_stop_sequence() -> None:
    body = "    return 1\n"
    assert truncate_completion(body + "\nprint(1)\ndef other():\n    pass") == body
    assert truncate_completion(body + "\ndef other():\n\nprint(1)") == body
    # A completion that starts with a stop sequence has no body at all.
    assert truncate_completion("\ndef other():\n    return 2\n") == ""


def test_speedup_is_a_ratio_of_throughputs_not_of_times() -> None:
    def row(strategy: str, tokens: int, seconds: float) -> dict:
        return {"index": 0, "generation_strategy": strategy, "token_ids": list(range(tokens)),
                "num_generated_tokens": tokens, "total_time": seconds}  # fmt: skip

    # The same time for half the tokens (stopped early) is half the speed.
    rows = [row("autoregressive", 10, 2.0), row("self_speculative", 5, 2.0)]
    comparison = compare_strategies(rows, ["autoregressive", "self_speculative"])
    assert comparison["speedup"]["self_speculative"] == pytest.approx(0.5)


def test_mismatches_count_samples_not_strategy_pairs() -> None:
    def row(index: int, strategy: str, tokens: list[int]) -> dict:
        return {"index": index, "generation_strategy": strategy, "token_ids": tokens,
                "num_generated_tokens": len(tokens), "total_time": 1.0}  # fmt: skip

    strategies = ["autoregressive", "self_speculative", "tree"]
    rows = [
        row(0, "autoregressive", [1, 2]), row(0, "self_speculative", [1, 3]), row(0, "tree", [1, 4]),
        row(1, "autoregressive", [5, 6]), row(1, "self_speculative", [5, 6]), row(1, "tree", [5, 6]),
    ]  # fmt: skip
    comparison = compare_strategies(rows, strategies)
    assert comparison["num_mismatches"] == 1 and comparison["mismatch_pct"] == 50.0
    assert len(comparison["mismatches"]) == 2  # both strategies' differences are listed


def test_learning_rate_warms_up_then_decays_to_its_floor() -> None:
    # Linear warm-up over 4 steps: the first step already trains at 1/4 of the peak.
    assert [lr_factor(step, 4, 14, 0.1) for step in range(4)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0]
    )
    # Cosine from the peak at the end of warm-up to min_ratio at the horizon.
    assert lr_factor(4, 4, 14, 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 4, 14, 0.1) == pytest.approx(0.55)
    assert lr_factor(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert lr_factor(99, 4, 14, 0.1) == pytest.approx(0.1)
    assert lr_factor(7, 0, None, 0.1) == 1.0  # horizon unknown: held at the peak


def test_pass_at_1_is_per_strategy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two strategies each strategy's pass@1 is over its own rows (not all rows)."""
    model_dir = save_tiny_model(tmp_path / "long", max_position_embeddings=2048)
    benchmark = importlib.import_module("benchmark")
    monkeypatch.setattr(benchmark, "human_eval_pass", lambda problem, completion: True)
    argv = [
        "--model", str(model_dir), "--dataset", "human_eval", "--num_samples", "2",
        "--max_steps", "3", "--sample", "False", "--execute_code", "True",
        "--generation_strategy", "autoregressive,self_speculative", "--exit_layer", "2",
        "--num_speculations", "2", "--output_dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    (result,) = (tmp_path / "logs").glob("benchmark_*.json")
    metrics = json.loads(Path(result).read_text())["metrics"]
    assert metrics["autoregressive"]["pass@1"] == 1.0
    assert metrics["self_speculative"]["pass@1"] == 1.0


def test_a_sample_is_drawn_with_seed_plus_its_index() -> None:
    """benchmarking's promise: sample i is sampled with ``seed + i`` whatever ran before it
    (so its output does not depend on the rank that ran it)."""
    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    config = generator.resolve(
        GenerationConfig(max_steps=8, sample=True, temperature=1.0, top_p=1.0)
    )
    samples = [Sample(3, "def add(a, b):", None), Sample(7, "def add(a, b):", None)]
    rows = list(generate_rows(generator, samples, [config], seed=11, with_text_metrics=False))
    for row in rows:
        expected = generator.generate(
            "def add(a, b):", config, generator=torch.Generator().manual_seed(11 + row["index"])
        )
        assert row["token_ids"] == expected.token_ids, row["index"]


def test_a_prompt_that_fills_the_whole_context_is_refused_before_the_run() -> None:
    """The generator refuses a prompt of exactly the context length: check_prompts must too
    (before any sample runs), and let one token shorter through."""
    generator = Generator(
        make_tiny_model("llama_gqa_tied", max_position_embeddings=16), make_tiny_tokenizer()
    )
    texts = ["x" + " y" * n + end for n in range(12) for end in ("", "!")]
    lengths = {len(generator.encode(text)): text for text in texts}
    check_prompts(generator, [Sample(0, lengths[15], None)])
    with pytest.raises(ConfigError, match="the prompt has 16 tokens"):
        check_prompts(generator, [Sample(0, lengths[16], None)])


def test_a_write_that_fails_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    with pytest.raises(RuntimeError), replaced_when_done(path) as temporary:
        temporary.write_text("half a docu")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_never_replaces_a_foreign_file_where_its_summary_goes(tmp_path: Path) -> None:
    sweep = importlib.import_module("sweep")
    csv_path = tmp_path / "config.csv"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="not a sweep summary"):
        sweep.check_siblings(csv_path)
    (tmp_path / "config.json").write_text('{"script": "sweep.py"}')
    sweep.check_siblings(csv_path)  # an earlier sweep's summary may be replaced
