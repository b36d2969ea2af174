"""Hostile user corpora for the training-side scripts (train.py, train_adapter.py,
layer_report.py): --exclude spellings, globs that match nothing, long runs without a space,
gzipped JSONL in layer_report, a corpus too small for train_adapter's held-out blocks."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from self_speculation.errors import ConfigError
from self_speculation.training.data import read_texts, resolve_files, train_tokenizer
from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "held").mkdir()
    (tmp_path / "c" / "train" / "a.txt").write_text("train text\n")
    (tmp_path / "c" / "held" / "b.txt").write_text("held-out text\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        ("./c/**/*.txt", "./c/held/*"),  # a "./" on either side
        ("c/**/*.txt", "./c/held/*"),
        ("./c/**/*.txt", "c/held/*"),
        ("c/**/*.txt", "{root}/c/held/*"),  # an absolute rule, relative data
        ("{root}/c/**/*.txt", "c/held/*"),  # relative rule, absolute data
        ("c/**/*.txt", "c/held"),  # a directory
        ("c/**/*.txt", "c/held/"),
        ("c/**/*.txt", "c/h*ld"),  # a glob of directories (it left out nothing)
        ("c/**/*.txt", "*/held"),
    ],
)
def test_exclude_leaves_out_the_file_however_it_is_spelled(
    corpus: Path, data: str, rule: str
) -> None:
    files = resolve_files([data.format(root=corpus)], [rule.format(root=corpus)])
    assert [path.name for path in files] == ["a.txt"]


def test_exclude_is_not_matched_against_the_working_directory(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "*/test/*" leaves out test folders of the data, not everything because the run
    # happens to start inside a folder called "test".
    (corpus / "test").mkdir()
    (corpus / "test" / "c").symlink_to(corpus / "c")
    monkeypatch.chdir(corpus / "test")
    files = resolve_files(["c/**/*.txt"], ["*/test/*"])
    assert [path.name for path in files] == ["b.txt", "a.txt"]


def test_a_pattern_or_rule_that_matches_nothing_is_warned_about(
    corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        files = resolve_files(["c/**/*.txt", "typo/*.jsonl"], ["c/nothing/*"])
    assert len(files) == 2
    assert "--data typo/*.jsonl matches no file" in caplog.text
    assert "--exclude c/nothing/* leaves out no file" in caplog.text


def test_a_long_run_without_a_space_does_not_stall_tokenizer_training() -> None:
    # Before: the BPE trainer took 3 minutes on a 400,000-letter word, hours on 5 MB.
    script = (
        "from self_speculation.training.data import train_tokenizer\n"
        "train_tokenizer(['a' * 2_000_000, '0123456789' * 200_000, 'x y z'], 300)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", script], check=True, timeout=120, env=environment, cwd=REPO
    )


def test_text_without_long_runs_trains_the_tokenizer_it_trained_before() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = ["def add(a, b):\n    return a + b\n", "x" * 4096 + " tail", "word " * 300]
    trained = train_tokenizer(texts, 400)
    reference = Tokenizer(models.BPE())
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    assert trained.backend_tokenizer.get_vocab() == reference.get_vocab()
    # A long run is still encoded whole (cut for training only).
    long_text = "b" * 20_000
    assert trained.decode(trained(long_text, add_special_tokens=False)["input_ids"]) == long_text


def test_layer_report_reads_gzipped_jsonl(tmp_path: Path) -> None:
    from layer_report import check_text_files

    records = [json.dumps({"text": f"line {number} of text"}) for number in range(50)]
    path = tmp_path / "held.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(records) + "\n")
    check_text_files([path])  # before: "is a binary file (NUL byte at offset 8)"
    assert len(list(read_texts([path]))) == 50
    plain = tmp_path / "notes.txt.gz"  # a gzipped document: read decompressed
    plain.write_bytes(gzip.compress(b"plain text\n"))
    check_text_files([plain])
    assert list(read_texts([plain])) == ["plain text\n"]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError, match="cannot read"):
        check_text_files([cut])


def test_layer_report_runs_on_gzipped_jsonl(tiny_model_dir: Path, tmp_path: Path) -> None:
    import layer_report

    path = tmp_path / "held.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for number in range(40):
            handle.write(
                json.dumps({"text": f"def f{number}(a):\n    return a * {number}\n"}) + "\n"
            )
    output = tmp_path / "report"
    argv = ["--model", str(tiny_model_dir), "--data", str(path), "--seq_len", "32",
            "--max_tokens", "128", "--output_dir", str(output)]  # fmt: skip
    assert layer_report.main(argv) == 0
    report = json.loads((output / "layer_report.json").read_text())
    assert report["models"][0]["tokens"] > 0


def test_train_adapter_refuses_a_corpus_too_small_before_computing_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import train_adapter as script

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 20)  # a few blocks of 32
    monkeypatch.setattr(
        script, "compute_targets", lambda *a, **k: pytest.fail("targets computed first")
    )
    arguments = script.AdapterTrainArguments(
        output_dir=str(tmp_path / "adapter"),
        model="tiny",
        exit_layer=2,
        data=[str(corpus)],
        seq_len=32,
        held_out_blocks=100,
        batch_size=4,
    )
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    with pytest.raises(ConfigError, match="held_out_blocks 100 \\+ --batch_size 4 needs 104"):
        script.train_adapter(arguments, model, make_tiny_tokenizer())
