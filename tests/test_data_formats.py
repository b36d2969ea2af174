"""--data_path files told apart by what they hold, not by their names.

A gzipped JSONL file whose name does not end in ".gz" (".GZ", ".gzip") was read as text and
refused as "not UTF-8 text"; a ".gz" name on plain JSONL was refused as "Not a gzipped file".
TOPv2's release files are tab-separated (domain, utterance, semantic_parse under a header):
the refusal says so and how to convert them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas
import pytest

from arguments import BenchmarkArguments
from data import DataError, load_examples

ROWS = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
JSONL = "".join(json.dumps(row) + "\n" for row in ROWS).encode()


def pairs(path: Path, dataset: str = "custom_jsonl") -> list[tuple[str, str | None]]:
    args = BenchmarkArguments(dataset=dataset, data_path=str(path), random_shuffle=False)
    return [(example.input, example.output) for example in load_examples(args, seed=0)]


@pytest.mark.parametrize("name", ["data.JSONL.GZ", "data.jsonl.gzip", "data.jsonl"])
def test_gzipped_jsonl_is_read_whatever_its_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(gzip.compress(JSONL))
    assert pairs(path) == [("a", "b"), ("c", "d")]


def test_plain_jsonl_named_gz_is_read(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(JSONL)
    assert pairs(path) == [("a", "b"), ("c", "d")]


def test_a_topv2_tsv_file_is_refused_with_how_to_convert_it(tmp_path: Path) -> None:
    tsv = tmp_path / "alarm_test.tsv"
    tsv.write_text(
        "domain\tutterance\tsemantic_parse\n"
        'alarm\tset an alarm for "8am"\t[IN:CREATE_ALARM [SL:DATE_TIME for 8am ] ]\n'
        "alarm\tNA\t[IN:CREATE_ALARM ]\n"
    )
    with pytest.raises(DataError, match="line 1: not valid JSON") as raised:
        pairs(tsv, "top_v2")
    assert "tab-separated" in str(raised.value) and "\n" not in str(raised.value)
    # The conversion the message gives keeps quotes and "NA" as text.
    out = tmp_path / "OUT.jsonl"
    pandas.read_csv(tsv, sep="\t", quoting=3, dtype=str, keep_default_na=False).to_json(
        out, orient="records", lines=True
    )
    assert pairs(out, "top_v2") == [
        ('set an alarm for "8am"', "[IN:CREATE_ALARM [SL:DATE_TIME for 8am ] ]"),
        ("NA", "[IN:CREATE_ALARM ]"),
    ]


def test_a_tab_inside_a_later_bad_line_gives_no_tsv_hint(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(JSONL + b"not json\there\n")
    with pytest.raises(DataError, match="line 3: not valid JSON") as raised:
        pairs(path)
    assert "tab-separated" not in str(raised.value)
