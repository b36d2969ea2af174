"""Every result row names where its sample came from: ``index`` is the sample's position in
the run (after ``--random_shuffle`` and skipped rows), so a researcher joining per-sample
results back to a data file, or per-problem pass@1 to HumanEval, had only the prompt text
to join on. Rows now carry ``source_row`` (the position in the file or split) and, for
HumanEval, ``task_id``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from arguments import BenchmarkArguments
from data import load_examples


def test_source_row_survives_shuffling_and_skipped_articles(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(8)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = BenchmarkArguments(dataset="custom_jsonl", data_path=str(path), random_shuffle=True)
    examples = load_examples(args, seed=3)
    assert [e.index for e in examples] == list(range(8))
    assert all(example.input == f"p{example.source_row}" for example in examples)
    assert [e.source_row for e in examples] != list(range(8))  # shuffled

    long = [{"article": " ".join(f"w{i}_{j}" for j in range(150)), "id": str(i)} for i in range(3)]
    short = {"article": "The cat sat on the mat.", "id": "s"}
    cnn = tmp_path / "cnn.jsonl"
    cnn.write_text("".join(json.dumps(row) + "\n" for row in [short, long[0], short, long[1]]))
    args = BenchmarkArguments(dataset="cnn_dm_lm", data_path=str(cnn), random_shuffle=False)
    assert [e.source_row for e in load_examples(args, seed=0)] == [1, 3]


def test_human_eval_rows_carry_task_id_and_source_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    benchmark = importlib.import_module("benchmark")  # the shipped model: a 1,024-token context
    argv = [
        "--dataset", "human_eval", "--num_samples", "2",
        "--max_steps", "2", "--sample", "False", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    (samples,) = tmp_path.glob("benchmark_*.samples.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["task_id"] == f"HumanEval/{row['source_row']}"
