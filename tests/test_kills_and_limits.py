"""Hard kills and resource limits (a deleted output folder, a file size limit, a
killed kernel build, a sweep killed between its plot and its summary)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from self_speculation.benchmarking import JsonlWriter, append_line, write_json_atomic
from self_speculation.cpu_kernels import build_guard
from self_speculation.errors import save_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_rows_written_after_the_output_folder_was_deleted_stop_the_run(tmp_path: Path) -> None:
    """benchmark.py / correctness.py / eval.py stream rows through JsonlWriter: with the
    folder removed mid-run, the rows went to an unlinked file and the run ended saying it
    wrote them (exit 0). Now the next row stops the run, naming the file."""
    folder = tmp_path / "logs"
    with JsonlWriter(folder / "run.samples.jsonl") as writer:
        writer.write({"index": 0})
        for entry in folder.iterdir():
            entry.unlink()
        folder.rmdir()
        with pytest.raises(
            FileNotFoundError, match="removed while the run was writing it"
        ) as error:
            writer.write({"index": 1})
    assert error.value.filename == str(folder / "run.samples.jsonl")


def _limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_append_line_past_a_file_size_limit_leaves_no_half_line(tmp_path: Path) -> None:
    """sweep.py's CSV rows: a write cut short by a file size limit (or a full disk) is
    cut back, so the CSV holds whole rows only (it ended in half a row before)."""
    path = tmp_path / "sweep.csv"
    code = (
        "import resource, sys\n"
        "from self_speculation.benchmarking import append_line\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))\n"
        f"append_line({str(path)!r}, 'a' * 60)\n"
        "try:\n"
        f"    append_line({str(path)!r}, 'b' * 60)\n"
        "except OSError as error:\n"
        "    print(error.errno, error.filename)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["27", str(path)]  # EFBIG, naming the file
    assert path.read_text() == "a" * 60 + "\n"
    append_line(path, "c")  # without the limit the next row starts on a line of its own
    assert path.read_text().splitlines() == ["a" * 60, "c"]


def test_a_tokenizer_save_that_fails_to_write_is_an_oserror(tmp_path: Path) -> None:
    """train.py under a full disk or `ulimit -f`: the Rust tokenizers library raised a plain
    Exception ("File too large (os error 27)"), printed as a traceback."""

    class RustTokenizer:
        def save_pretrained(self, directory: object) -> None:
            raise Exception("File too large (os error 27)")  # noqa: TRY002

    with pytest.raises(OSError) as error:
        save_tokenizer(RustTokenizer(), tmp_path / "tokenizer")
    assert (error.value.errno, error.value.filename) == (27, str(tmp_path / "tokenizer"))

    class Broken:
        def save_pretrained(self, directory: object) -> None:
            raise ValueError("something else")

    with pytest.raises(ValueError, match="something else"):
        save_tokenizer(Broken(), tmp_path)


def test_train_py_under_a_file_size_limit_is_one_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def f(x):\n    return x + 1\n" * 200)
    argv = [
        "--preset", "tiny", "--vocab_size", "300", "--seq_len", "32", "--batch_size", "4",
        "--max_tokens", "256", "--num_threads", "1", "--data", f"{corpus}/*.py",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: _limit_file_size(1024),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "File too large" in result.stderr.strip().splitlines()[-1]


def test_a_killed_builds_lock_is_removed_at_once(tmp_path: Path) -> None:
    """torch's build lock file, left by a build killed with SIGKILL, made every later
    --compile run wait 10 minutes (STALE_LOCK_SECONDS) before building."""
    build = tmp_path / "layerskip_few_row_linear_x"
    build.mkdir()
    (build / "lock").touch()  # what a killed build leaves
    with build_guard(build):
        assert not (build / "lock").exists()


def test_a_live_build_is_waited_for(tmp_path: Path) -> None:
    """Another process building holds the flock: its lock file is not removed under it."""
    build = tmp_path / "layerskip_few_row_linear_x"
    build.mkdir()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from self_speculation.cpu_kernels import build_guard\n"
        f"build = Path({str(build)!r})\n"
        "with build_guard(build):\n"
        "    (build / 'lock').touch()\n"
        "    print('building', flush=True)\n"
        "    time.sleep(3)\n"
        "    (build / 'lock').unlink()\n"
        "    (build / 'built').touch()\n"
    )
    builder = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert builder.stdout.readline().strip() == "building"
        with build_guard(build):  # waits for the builder, which removed its own lock
            assert (build / "built").exists()
    finally:
        assert builder.wait(timeout=60) == 0


def test_a_sweep_killed_after_its_summary_is_rerun(tmp_path: Path, monkeypatch) -> None:
    """sweep.py wrote its plot, then its summary: killed in between, the folder held a
    sweep.png without sweep.json, and the rerun with the same flags was refused ("the
    sweep's plot goes to ..., which exists and no sweep summary beside it says it is a
    sweep's"). The summary now comes first."""
    import sweep

    order = []
    monkeypatch.setattr(sweep, "write_json_atomic", lambda path, document: order.append("json"))
    monkeypatch.setattr(sweep, "_plot", lambda table, path: order.append("png"))
    monkeypatch.setattr(sweep, "environment_info", lambda *arguments: {})
    monkeypatch.setattr(sweep, "arguments_dict", lambda *parts: {})
    csv_path = tmp_path / "sweep.csv"
    row = {
        "generation_strategy": "self_speculative", "exit_layer": 1, "num_speculations": 2,
        "acceptance_rate": 1.0, "total_time": 1.0, "time_per_token": 0.1,
        "tokens_per_second": 10.0, "overall_tokens_per_second": 10.0, "tokens_per_step": 2.0,
        "speedup": 1.0, "num_samples": 1, "setting": "abc",
    }  # fmt: skip
    sweep._append_row(csv_path, row)
    from self_speculation.config import GenerationStrategyName

    points = [(GenerationStrategyName.SELF_SPECULATIVE, 1, 2)]
    grid = types.SimpleNamespace(baseline=True)
    sweep._finish(csv_path, "abc", points, None, None, None, grid, None, None, None)
    assert order == ["json", "png"]
    # A summary without its plot (killed between them) is a sweep's folder: no refusal.
    (tmp_path / "sweep.json").write_text(json.dumps({"script": "sweep.py"}))
    sweep.check_siblings(csv_path)


def test_temporaries_of_killed_writers_are_removed_before_the_next_write(tmp_path: Path) -> None:
    """A writer killed outright leaves its temporary (a corpus build: up to 85 MB each
    time); the next atomic write of the same file removes those of processes that are gone,
    once unchanged for a minute, and nothing of a live writer."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, live_pid = int(gone.stdout), os.getpid()
    target = tmp_path / "result.json"
    abandoned = tmp_path / f".result.json.{dead_pid}.{'a' * 32}.tmp"
    fresh = tmp_path / f".result.json.{dead_pid}.{'b' * 32}.tmp"  # a writer on another host?
    live = tmp_path / f".result.json.{live_pid}.{'c' * 32}.tmp"
    other = tmp_path / f".other.json.{dead_pid}.{'d' * 32}.tmp"
    old = time.time() - 3600
    for path in (abandoned, fresh, live, other):
        path.write_text("partial")
        if path is not fresh:
            os.utime(path, (old, old))
    write_json_atomic(target, {"done": True})
    assert json.loads(target.read_text()) == {"done": True}
    assert not abandoned.exists()
    assert fresh.exists() and live.exists() and other.exists()


def test_a_build_lock_that_cannot_be_opened_falls_back_to_the_timed_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's lock file, or a file system without flock: the build goes on (it
    said the kernel was unavailable)."""
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith("layerskip-build.flock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    built = []
    with build_guard(tmp_path / "build"):
        built.append(True)
    assert built == [True]
