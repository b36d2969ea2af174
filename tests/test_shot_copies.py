"""n-shot prompts never show the evaluated sample's own answer: a shot is neither the sample
nor a copy of it (a duplicate row of the file), and too few other examples is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arguments import BenchmarkArguments
from data import DataError, load_examples


def _write(path: Path, pairs: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return str(path)


def test_a_duplicate_of_the_sample_is_never_its_shot(tmp_path: Path) -> None:
    pairs = [("Q: 1+1? A:", " 2"), ("Q: 1+1? A:", " 2"), ("Q: 2+2? A:", " 4")]
    pairs += [(f"Q: {i}*{i}? A:", f" {i * i}") for i in range(3, 9)]
    data = _write(tmp_path / "data.jsonl", pairs)
    for seed in range(12):  # each seed's shot order: a duplicate first would be taken
        args = BenchmarkArguments(dataset="custom_jsonl", data_path=data, n_shot=2)
        for example in load_examples(args, seed=seed):
            shots, _, question = example.input.rpartition("\n\n")
            assert question not in shots, (seed, example.input)


def test_too_few_examples_besides_the_sample_and_its_copies(tmp_path: Path) -> None:
    data = _write(tmp_path / "data.jsonl", [("Q: 1+1? A:", " 2")] * 3 + [("Q: 2+2? A:", " 4")])
    args = BenchmarkArguments(dataset="custom_jsonl", data_path=data, n_shot=2)
    with pytest.raises(DataError, match="examples other than sample"):
        load_examples(args, seed=0)
