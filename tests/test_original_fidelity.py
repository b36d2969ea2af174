"""Fidelity to the original tool's benchmark: n-shot shots, cnn_dm_lm words, ROUGE definition."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from arguments import BenchmarkArguments  # noqa: E402
from data import load_examples  # noqa: E402


def _cnn(tmp_path):
    train = {
        "article": [f"train article {i}" for i in range(30)],
        "highlights": [f"train summary {i}" for i in range(30)],
        "id": [str(i) for i in range(30)],
    }
    test = {
        "article": [f"test article {i}" for i in range(8)],
        "highlights": [f"test summary {i}" for i in range(8)],
        "id": [str(i) for i in range(8)],
    }
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(train), "test": datasets.Dataset.from_dict(test)}
    )
    saved.save_to_disk(str(tmp_path / "cnn"))
    return str(tmp_path / "cnn"), saved


def test_n_shot_uses_the_originals_shots(tmp_path) -> None:
    path, saved = _cnn(tmp_path)
    args = BenchmarkArguments(dataset="cnn_dm_summarization", data_path=path, n_shot=3)
    examples = load_examples(args, 42)
    # the original: load_dataset(..., split="train").shuffle(seed=seed).select(range(n_shot)),
    # the same shots before every test article
    shots = saved["train"].shuffle(seed=42).select(range(3))
    expected = (
        "".join(f"Article: {row['article']}\nSummary: {row['highlights']}\n" for row in shots)
        + "\n"
    )
    for example in examples:
        assert example.input.startswith(expected), example.input[:200]
        assert example.input[len(expected) :].startswith("Article: test article")


def test_cnn_dm_lm_counts_whitespace_separated_words(tmp_path) -> None:
    words = [f"w{i}" for i in range(130)]
    article = "  ".join(words[:60]) + "\n" + " ".join(words[60:])  # double spaces, a newline
    path = tmp_path / "cnn.jsonl"
    path.write_text(__import__("json").dumps({"article": article, "highlights": "h"}) + "\n")
    args = BenchmarkArguments(dataset="cnn_dm_lm", data_path=str(path))
    (example,) = load_examples(args, 42)
    assert example.input == " ".join(words[:100])  # the original's " ".join(split()[:100])
    assert example.output.split() == words[100:]


def test_original_rouge_keeps_punctuation_and_does_not_stem() -> None:
    from self_speculation.metrics import char_edit_distance, text_metrics

    metrics = text_metrics("    return a+b\n", "    return a + b\n")
    # whitespace tokens: prediction [return, a+b], reference [return, a, +, b]: 1 match,
    # P = 1/2, R = 1/4, F = 1/3 (torchmetrics ROUGEScore with a lower-casing normalizer)
    assert metrics["original_rouge1"] == pytest.approx(1 / 3)
    assert metrics["original_rougeL"] == pytest.approx(1 / 3)
    assert metrics["rouge1"] == pytest.approx(1.0)  # stemmed, punctuation dropped
    assert text_metrics("Cats Sat", "cats sit")["original_rouge1"] == pytest.approx(0.5)
    assert char_edit_distance("kitten", "sitting") == 3
    assert metrics["char_edit_distance"] == 2.0
