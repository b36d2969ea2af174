"""Metrics: real exact match, argument order, speed summaries, result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from self_speculation.benchmarking import (
    JsonlWriter,
    compare_strategies,
    first_difference,
    write_json_atomic,
)
from self_speculation.metrics import (
    corpus_bleu,
    edit_distance,
    exact_match,
    human_eval_pass,
    summarize_speed,
    summarize_text,
    text_metrics,
    truncate_completion,
)


def test_exact_match_is_exact() -> None:
    assert exact_match("return a + b", " return a + b\n") == 1.0
    assert exact_match("return a + b", "return a - b") == 0.0
    assert text_metrics("the cat", "the cat")["exact_match"] == 1.0
    assert text_metrics("the cat sat", "the cat")["exact_match"] == 0.0


def test_edit_distance_counts_word_edits() -> None:
    assert edit_distance("the cat sat", "the cat sat") == 0
    assert edit_distance("the dog sat", "the cat sat") == 1
    assert edit_distance("the cat", "the cat sat on") == 2


def test_metric_argument_order() -> None:
    prediction, reference = "the cat", "the cat sat on the mat today"
    metrics = text_metrics(prediction, reference)
    # BLEU's brevity penalty punishes a prediction shorter than its reference, not the reverse.
    assert metrics["bleu"] == pytest.approx(sacrebleu.sentence_bleu(prediction, [reference]).score)
    assert metrics["bleu"] != pytest.approx(sacrebleu.sentence_bleu(reference, [prediction]).score)
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)
    assert metrics["rougeL"] == pytest.approx(expected["rougeL"].fmeasure)
    assert set(metrics) == {
        "rouge1",
        "rouge2",
        "rouge3",
        "rougeL",
        "original_rouge1",
        "original_rouge2",
        "original_rouge3",
        "original_rougeL",
        "bleu",
        "exact_match",
        "edit_distance",
        "char_edit_distance",
    }


def test_corpus_bleu_and_text_summary() -> None:
    rows = [
        {
            "prediction": "a b c d e",
            "reference": "a b c d e",
            **text_metrics("a b c d e", "a b c d e"),
        },
        {"prediction": "x y", "reference": "a b c d e", **text_metrics("x y", "a b c d e")},
    ]
    summary = summarize_text(rows)
    assert summary["exact_match"] == 0.5
    assert summary["corpus_bleu"] == pytest.approx(
        corpus_bleu(["a b c d e", "x y"], ["a b c d e", "a b c d e"])
    )


def test_speed_summary_means_and_totals() -> None:
    rows = [
        {"acceptance_rate": None, "total_time": 1.0, "time_per_token": 0.1, "tokens_per_second": 10.0,
         "tokens_per_step": 1.0, "num_generated_tokens": 10, "num_drafted": 0, "num_accepted": 0},
        {"acceptance_rate": 0.5, "total_time": 3.0, "time_per_token": 0.1, "tokens_per_second": 10.0,
         "tokens_per_step": 2.0, "num_generated_tokens": 30, "num_drafted": 20, "num_accepted": 10},
    ]  # fmt: skip
    summary = summarize_speed(rows)
    assert summary["acceptance_rate"] == 0.5  # samples without drafts do not count
    assert summary["total_time"] == 2.0 and summary["tokens_per_second"] == 10.0
    assert summary["total_generated_tokens"] == 40 and summary["total_generation_time"] == 4.0
    assert (
        summary["overall_tokens_per_second"] == 10.0 and summary["overall_acceptance_rate"] == 0.5
    )
    assert summarize_speed([])["acceptance_rate"] is None


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_compare_strategies() -> None:
    def row(index, strategy, tokens, seconds):
        return {"index": index, "generation_strategy": strategy, "token_ids": tokens,
                "num_generated_tokens": len(tokens), "total_time": seconds}  # fmt: skip

    rows = [
        row(0, "autoregressive", [1, 2, 3], 3.0), row(0, "self_speculative", [1, 2, 3], 1.0),
        row(1, "autoregressive", [4, 5, 6], 3.0), row(1, "self_speculative", [4, 9, 6], 2.0),
    ]  # fmt: skip
    comparison = compare_strategies(rows, ["autoregressive", "self_speculative"])
    assert comparison["speedup"]["self_speculative"] == pytest.approx(2.0)
    assert comparison["num_mismatches"] == 1 and comparison["mismatch_pct"] == 50.0
    assert comparison["mismatches"] == [
        {"index": 1, "generation_strategy": "self_speculative", "first_difference": 1}
    ]
    assert not comparison["outputs_identical"]


def test_result_files_are_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "out" / "result.json"
    write_json_atomic(path, {"nan": math.nan, "inf": math.inf, "tuple": (1, 2), "path": tmp_path})
    assert json.loads(path.read_text()) == {
        "nan": None,
        "inf": None,
        "tuple": [1, 2],
        "path": str(tmp_path),
    }
    write_json_atomic(path, {"second": 2})  # replaced whole
    assert json.loads(path.read_text()) == {"second": 2}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left
    rows_path = tmp_path / "rows.jsonl"
    with JsonlWriter(rows_path) as writer:
        writer.write({"a": 1})
        writer.write({"b": math.nan})
    assert [json.loads(line) for line in rows_path.read_text().splitlines()] == [
        {"a": 1},
        {"b": None},
    ]


def test_result_file_mode_is_an_ordinary_file(tmp_path: Path) -> None:
    """The result document is as readable as the rows next to it (not mkstemp's 0600)."""
    write_json_atomic(tmp_path / "result.json", {"a": 1})
    with JsonlWriter(tmp_path / "rows.jsonl") as writer:
        writer.write({"a": 1})
    assert (tmp_path / "result.json").stat().st_mode == (tmp_path / "rows.jsonl").stat().st_mode


def test_rows_file_of_a_run_that_failed_before_any_row_is_removed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), JsonlWriter(tmp_path / "empty.jsonl"):
        raise RuntimeError("the run failed before its first row")
    assert not (tmp_path / "empty.jsonl").exists()
    with pytest.raises(KeyboardInterrupt), JsonlWriter(tmp_path / "some.jsonl") as writer:
        writer.write({"a": 1})
        raise KeyboardInterrupt  # the rows written so far are kept
    assert json.loads((tmp_path / "some.jsonl").read_text()) == {"a": 1}
    with JsonlWriter(tmp_path / "none.jsonl"):
        pass  # a run with no rows that ends normally keeps its (empty) file
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_human_eval_truncation_and_pass() -> None:
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    problem = {
        "task_id": "toy/0",
        "prompt": "def add(a, b):\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    assert human_eval_pass(problem, "    return a + b\n\nprint('extra')")
    assert not human_eval_pass(problem, "    return a - b\n")
