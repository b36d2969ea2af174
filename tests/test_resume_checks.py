"""train.py --resume True: refusals and damage.

A resume whose data files changed under the same --data glob used to continue silently on
other blocks (another shuffle, a data position that means nothing); a truncated DCP shard or
.metadata file used to end in a traceback (DCP's CheckpointException is a BaseException);
a damaged train_config.json used to end in a JSONDecodeError traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import write_python_corpus

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--vocab_size", "300", "--seq_len", "32", "--batch_size", "4"]
QUICK = ["--warmup_steps", "2", "--log_every", "1", "--num_threads", "1"]
QUICK += ["--save_every_minutes", "0", "--bf16", "False", "--max_tokens", str(6 * 4 * 32)]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, output_dir) of a run stopped after 3 of its 6 steps."""
    base = tmp_path_factory.mktemp("resume")
    corpus = write_python_corpus(base / "corpus")
    output_dir = base / "run"
    # A --data glob relative to the working directory: the copies below see their own corpus.
    result = run(*TINY, *QUICK, "--data", "corpus/*.py", "--output_dir", str(output_dir),
                 "--stop_after_steps", "3", cwd=base)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(output_dir) == [1, 2, 3]
    return corpus, output_dir


def _copy(stopped: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    corpus, output_dir = stopped
    corpus_copy, run_copy = tmp_path / "corpus", tmp_path / "run"
    shutil.copytree(corpus, corpus_copy)
    shutil.copytree(output_dir, run_copy)
    return corpus_copy, run_copy


def _resume(corpus: Path, output_dir: Path) -> subprocess.CompletedProcess:
    return run(*TINY, *QUICK, "--data", "corpus/*.py", "--output_dir", str(output_dir),
               "--resume", "True", cwd=corpus.parent)  # fmt: skip


def test_a_resume_on_changed_data_files_is_refused_in_one_line(
    stopped: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, output_dir = _copy(stopped, tmp_path)
    # Same --data glob, one more file under it: other blocks, another shuffle.
    (corpus / "module_9.py").write_text("".join(f"x_{n} = {n * 7}\n" for n in range(300)))
    result = _resume(corpus, output_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "training data is not the checkpoint's" in result.stderr.strip().splitlines()[-1]
    assert steps(output_dir) == [1, 2, 3]


def test_a_resume_on_edited_data_of_the_same_size_is_refused(
    stopped: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, output_dir = _copy(stopped, tmp_path)
    text = (corpus / "module_1.py").read_text()
    (corpus / "module_1.py").write_text(text.replace("return value", "return other", 5))
    result = _resume(corpus, output_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "training data is not the checkpoint's" in result.stderr


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp"])
def test_a_truncated_dcp_file_is_one_line(
    stopped: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    corpus, output_dir = _copy(stopped, tmp_path)
    path = output_dir / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = _resume(corpus, output_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "is damaged or incomplete" in result.stderr.strip().splitlines()[-1]


def test_a_damaged_run_record_does_not_stop_a_resume(
    stopped: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, output_dir = _copy(stopped, tmp_path)
    record = output_dir / "train_config.json"
    record.write_text(record.read_text()[:100])
    result = _resume(corpus, output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(output_dir) == [1, 2, 3, 4, 5, 6]
    assert (output_dir / "train_config.json.damaged").is_file()
    document = json.loads(record.read_text())
    assert [entry["step"] for entry in document["resumes"]] == [3]


def test_a_missing_random_state_file_is_named(stopped: tuple[Path, Path], tmp_path: Path) -> None:
    """Same number of processes, its rng file gone: the warning names the file (it said the
    checkpoint was written by 1 processes and resumed on 1)."""
    corpus, output_dir = _copy(stopped, tmp_path)
    (output_dir / "checkpoint" / "rng-0.pt").unlink()
    result = _resume(corpus, output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "random states" in line]
    assert len(warnings) == 1 and "rng-0.pt is missing" in warnings[0], warnings
    assert steps(output_dir) == [1, 2, 3, 4, 5, 6]
