"""Gzipped text is read decompressed wherever train.py, train_adapter.py and
layer_report.py read data, known by its first bytes: a gzipped document (a ``.txt.gz``
corpus, Debian's ``changelog.Debian.gz``) was skipped by train.py as a binary file (so a
glob of them trained on nothing) and refused by layer_report.py as one, and JSONL
gzipped under a plain name failed as not UTF-8."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from layer_report import check_text_files
from self_speculation.errors import ConfigError
from self_speculation.training.data import read_texts, resolve_files

CHANGELOG = "adduser (3.134) unstable; urgency=medium\n\n  * Fix a typo.\n"


def test_gzipped_documents_and_records_read_as_their_text(tmp_path: Path) -> None:
    (tmp_path / "changelog.Debian.gz").write_bytes(gzip.compress(CHANGELOG.encode()))
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"plain notes\n"))
    records = "".join(json.dumps({"text": text}) + "\n" for text in ("one", "two"))
    (tmp_path / "records.jsonl").write_bytes(gzip.compress(records.encode()))
    (tmp_path / "plain.jsonl.gz").write_text(records)  # named .gz, not gzipped
    files = resolve_files([f"{tmp_path}/*"])
    check_text_files(files)  # layer_report.py: none refused as binary
    assert sorted(read_texts(files)) == sorted(
        [CHANGELOG, "plain notes\n", "one", "two", "one", "two"]
    )


def test_a_damaged_gzipped_document_is_one_line(tmp_path: Path) -> None:
    data = gzip.compress(CHANGELOG.encode() * 200)
    (tmp_path / "changelog.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot read .*changelog.gz"):
        list(read_texts([tmp_path / "changelog.gz"]))


def test_a_gzipped_binary_is_skipped_without_inflating_it_whole(tmp_path: Path) -> None:
    """A .tar.gz caught by a glob was decompressed whole in memory before being skipped as
    binary: only its first 64 KiB are now (a tar header holds NUL bytes)."""
    import tarfile
    import tracemalloc

    (tmp_path / "big.txt").write_text("x = 1\n" * 4_000_000)  # 24 MB, 24 KB gzipped
    with tarfile.open(tmp_path / "archive.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "big.txt", arcname="big.txt")
    (tmp_path / "big.txt").unlink()
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"notes\n"))
    tracemalloc.start()
    try:
        assert list(read_texts(sorted(tmp_path.iterdir()))) == ["notes\n"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak
