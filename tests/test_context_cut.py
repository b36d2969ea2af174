"""A benchmark whose outputs reach the model's context says so in its result document and
its log, not only row by row in the samples file."""

from __future__ import annotations

import collections
import importlib
import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer


def test_stop_reasons_are_counted_most_frequent_first() -> None:
    from self_speculation.metrics import stop_reasons

    rows = [{"stop_reason": reason} for reason in ("eos", "max_steps", "max_steps")]
    assert list(stop_reasons(rows).items()) == [("max_steps", 2), ("eos", 1)]
    assert stop_reasons([]) == {}


def test_outputs_cut_by_the_context_are_counted_and_warned_about(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    context = 256  # tiny_models' max_position_embeddings
    words = " ".join(f"w{i}" for i in range(400))
    ids = tokenizer(words)["input_ids"]
    long_prompt = tokenizer.decode(ids[1 : context - 6])  # room for a few tokens only
    assert context - 10 < len(tokenizer(long_prompt)["input_ids"]) < context
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": long_prompt, "response": "x"}, {"prompt": "w1 w2", "response": "y"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    benchmark = importlib.import_module("benchmark")
    argv = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(data),
        "--generation_strategy", "autoregressive", "--sample", "False", "--max_steps", "40",
        "--output_dir", str(tmp_path / "out"), "--random_shuffle", "False",
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="benchmark"):
        assert benchmark.main(argv) == 0
    (result,) = (tmp_path / "out").glob("benchmark_*[0-9].json")
    document = json.loads(result.read_text())
    samples = [json.loads(line) for line in Path(document["samples_file"]).read_text().splitlines()]
    assert samples[0]["stop_reason"] == "context_length"
    counts = document["metrics"]["autoregressive"].get("stop_reasons")
    assert counts == collections.Counter(sample["stop_reason"] for sample in samples)
    assert counts["context_length"] == 1
    assert "1 of 2 outputs reached the model's context" in caplog.text
