"""ROUGE of a reference without a word rouge-score keeps (another script, or blank).

rouge-score's tokenizer keeps a-z and 0-9 only: a Russian or Chinese reference has no words,
and it scores even a prediction equal to the reference 0.0. Such a ROUGE is None (nothing to
recall), left out of the means, and the log says n/a instead of 0.000.
"""

from __future__ import annotations

import logging

import pytest
from rouge_score import rouge_scorer

from benchmark import _log_summary
from self_speculation.metrics import ORIGINAL_ROUGE_KEYS, ROUGE_TYPES, summarize_text, text_metrics


@pytest.mark.parametrize("text", ["Привет, мир", "日本語のテキスト"])
def test_a_perfect_prediction_in_another_script_is_not_scored_zero(text: str) -> None:
    metrics = text_metrics(text, text)
    assert all(metrics[name] is None for name in ROUGE_TYPES)
    assert metrics["exact_match"] == 1.0 and metrics["bleu"] == pytest.approx(100.0)
    assert metrics["original_rouge1"] == 1.0  # whitespace words: the original's ROUGE has some


def test_a_blank_reference_has_no_rouge_of_either_kind() -> None:
    metrics = text_metrics("some words", " \n")
    assert all(metrics[key] is None for key in (*ROUGE_TYPES, *ORIGINAL_ROUGE_KEYS))


def test_latin_text_keeps_rouge_scores_figures() -> None:
    prediction, reference = "The cats sat on a mat.", "A cat sat on the mat in Zoë's café."
    expected = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True).score(
        reference, prediction
    )
    metrics = text_metrics(prediction, reference)
    for name in ROUGE_TYPES:
        assert metrics[name] == pytest.approx(expected[name].fmeasure)
        assert isinstance(metrics[name], float)
    assert isinstance(text_metrics("x", "y")["rougeL"], float)  # rouge-score gives int 0 there


def test_rows_without_words_are_left_out_of_the_mean() -> None:
    rows = [
        {"prediction": "Привет", "reference": "Привет"},
        {"prediction": "a cat", "reference": "a cat sat"},
    ]
    for row in rows:
        row.update(text_metrics(row["prediction"], row["reference"]))
    summary = summarize_text(rows)
    assert summary["rouge1"] == pytest.approx(rows[1]["rouge1"])
    assert summary["original_rouge1"] == pytest.approx(
        (rows[0]["original_rouge1"] + rows[1]["original_rouge1"]) / 2
    )
    only_cyrillic = summarize_text(rows[:1])
    assert only_cyrillic["rougeL"] is None


def test_the_log_says_n_a_for_a_rouge_no_sample_had(caplog: pytest.LogCaptureFixture) -> None:
    metrics = summarize_text([{"prediction": "Привет", "reference": "Привет", "rougeL": None}])
    metrics.update(
        exact_match=1.0,
        acceptance_rate=None,
        num_samples=1,
        overall_tokens_per_second=10.0,
        time_per_token=0.1,
    )
    with caplog.at_level(logging.INFO, logger="benchmark"):
        _log_summary({"metrics": {"autoregressive": metrics}})
    assert "ROUGE-L n/a" in caplog.text and "ROUGE-L 0.000" not in caplog.text
