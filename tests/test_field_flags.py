"""--prompt_field / --response_field name the fields of a custom_jsonl file; a dataset whose
fields are fixed (xsum's document and summary, say) ignored them, so the run read other
fields than the user named: they are refused there in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arguments import BenchmarkArguments
from data import DataError, load_examples


def _xsum(tmp_path: Path) -> Path:
    rows = [{"document": f"text {i}", "summary": f"sum {i}", "body": f"b {i}"} for i in range(3)]
    path = tmp_path / "xsum.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("flag", ["prompt_field", "response_field"])
def test_field_flags_are_refused_for_a_dataset_with_fixed_fields(tmp_path: Path, flag) -> None:
    args = BenchmarkArguments(
        dataset="xsum_summarization", data_path=str(_xsum(tmp_path)), **{flag: "body"}
    )
    with pytest.raises(DataError, match=f"--{flag} applies to --dataset custom_jsonl only"):
        load_examples(args, seed=0)


def test_field_flags_name_a_custom_files_fields(tmp_path: Path) -> None:
    args = BenchmarkArguments(
        dataset="custom_jsonl",
        data_path=str(_xsum(tmp_path)),
        prompt_field="body",
        response_field="summary",
        random_shuffle=False,
    )
    examples = load_examples(args, seed=0)
    assert [example.output for example in examples] == ["sum 0", "sum 1", "sum 2"]
    assert "b 0" in examples[0].input
    # The defaults change nothing for a fixed dataset.
    xsum = BenchmarkArguments(dataset="xsum_summarization", data_path=str(_xsum(tmp_path)))
    assert len(load_examples(xsum, seed=0)) == 3
