"""self_speculation/training/data.py: which files --data reads, and how (offline, no model)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from self_speculation.errors import ConfigError
from self_speculation.training.data import read_texts, resolve_files


def jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts))


@pytest.mark.parametrize("name", ["c.json", "c.JSONL", "c.ndjson", "c.jsonl"])
def test_json_lines_under_any_usual_name_are_read_as_records(tmp_path: Path, name: str) -> None:
    """datasets' to_json writes JSON Lines to whatever name it is given (often .json): its
    records, not its JSON syntax, are the documents."""
    (tmp_path / name).write_text(jsonl(["a = 1\n", "b = 2\n"]))
    assert list(read_texts(resolve_files([str(tmp_path / name)]))) == ["a = 1\n", "b = 2\n"]


def test_gzipped_json_lines_and_a_bom(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write(jsonl(["zipped"]))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(["bom"]).encode())
    (tmp_path / "bom.py").write_bytes(b"\xef\xbb\xbfx = 1\n")
    texts = list(read_texts(resolve_files([f"{tmp_path}/*"])))
    assert texts == ["bom", "x = 1\n", "zipped"]


def test_a_json_array_of_records_is_read_and_a_json_document_is_text(tmp_path: Path) -> None:
    """A .json file of records (datasets' to_json with lines=False) gives its records; one
    that holds no records (package.json in a code corpus) is a document, as before."""
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}], indent=2))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    (tmp_path / "package.json").write_text('{\n  "name": "p",\n  "version": "1.0"\n}\n')
    texts = list(read_texts(sorted(tmp_path.iterdir())))
    assert texts == ["x", "y", "x", "y", (tmp_path / "package.json").read_text()]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n[1, 2]\n')
    with pytest.raises(ConfigError, match="c.jsonl:2: no string field 'text'"):
        list(read_texts([tmp_path / "c.jsonl"]))


def test_lone_surrogate_is_a_config_error(tmp_path: Path) -> None:
    """The tokenizer fails on it with a bare UnicodeEncodeError / TypeError traceback."""
    (tmp_path / "s.jsonl").write_text('{"text": "abc \\ud800"}\n')
    with pytest.raises(ConfigError, match=r"s.jsonl:1: field 'text' is not valid UTF-8 text"):
        list(read_texts([tmp_path / "s.jsonl"]))


def test_symlinked_directories_count_once_and_loops_end(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "m.py").write_text("x = 1\n")
    os.symlink("..", tmp_path / "a" / "up")  # two loops: glob.glob never returned
    os.symlink("..", tmp_path / "b" / "up")
    os.symlink("a", tmp_path / "alias")
    assert resolve_files([f"{tmp_path}/**/*.py"]) == [tmp_path / "a" / "m.py"]
    assert resolve_files([f"{tmp_path}/alias/*.py"]) == [tmp_path / "alias" / "m.py"]


def test_globs_match_what_glob_matches(tmp_path: Path) -> None:
    """Directory names with glob characters are names, not patterns, under ``**``."""
    import glob

    (tmp_path / "br[1]").mkdir()
    (tmp_path / "br[1]" / "k.py").write_text("k = 1\n")
    (tmp_path / "top.py").write_text("t = 1\n")
    for pattern in (f"{tmp_path}/**/*.py", f"{glob.escape(str(tmp_path))}/br[[]1]/**/*.py"):
        expected = sorted(Path(name) for name in glob.glob(pattern, recursive=True))
        assert resolve_files([pattern]) == expected and expected


def test_a_damaged_gzipped_json_file_is_one_line(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "c.json.gz", "wt") as handle:
        handle.write(jsonl(["x"] * 200))
    data = (tmp_path / "c.json.gz").read_bytes()
    (tmp_path / "c.json.gz").write_bytes(data[:15])  # cut inside the first block
    with pytest.raises(ConfigError, match="cannot read"):
        list(read_texts([tmp_path / "c.json.gz"]))


def test_a_json_array_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recognising a .json file as an array of records parses it; reading it does not parse
    it again (a corpus's large array files doubled their load time)."""
    import self_speculation.training.data as data

    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}, {"no": 1}]))
    parses = []
    loads = json.loads
    monkeypatch.setattr(data.json, "loads", lambda text: parses.append(1) or loads(text))
    with pytest.raises(ConfigError, match="record 3 has no string field 'text'"):
        list(read_texts([tmp_path / "a.json"]))
    assert len(parses) == 1


def test_hub_rows_that_are_not_text_are_counted_or_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A dataset column with nulls loses them with a warning that counts them; a column of
    no strings at all (the wrong --text_field) is one error, not an empty corpus."""
    import datasets

    from self_speculation.training.data import hub_texts

    rows = {"text": ["a b", None, "", "c"], "label": [1, 2, 3, 4]}
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_dict(rows)
    )
    with caplog.at_level("WARNING"):
        assert hub_texts("d", None, "train", "text") == ["a b", "c"]
    assert "skipped 1 of 4 rows whose 'text' is not a string (e.g. None)" in caplog.text
    with pytest.raises(ConfigError, match="column 'label' holds no strings"):
        hub_texts("d", None, "train", "label")
