"""Where results are written: nothing there is replaced or lost without being asked, and a
path that cannot take the results is one line before the work, not a traceback after it.

benchmarks/build_corpus.py (the training corpus), benchmarks/train_throughput.py and
eval.py's --use_cache folder."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest

from arguments import run_main

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
EXIT_ERROR = 2


def _run(module, argv: list[object], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, prog=f"{module.__name__}.py")
    return exit_info.value.code, capsys.readouterr().err


def _one_error_line(stderr: str, prog: str, fragment: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and fragment in errors[0], stderr


# --- benchmarks/build_corpus.py -------------------------------------------------------------


@pytest.fixture()
def build_corpus(tmp_path: Path, monkeypatch):
    """build_corpus on a small fake standard library (the held-out files and two modules)
    and no site-packages, so that a build takes milliseconds."""
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "benchmarks"))
    import build_corpus as module

    stdlib, site = tmp_path / "stdlib", tmp_path / "site"
    for name in module.HELD_OUT:
        (stdlib / name).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / name).write_text(f"# held out: {name}\n")
    (stdlib / "alpha.py").write_text("def alpha():\n    return 1\n")
    (stdlib / "beta.py").write_text("def beta():\n    return 2\n")
    site.mkdir()
    paths = {**sysconfig.get_paths(), "stdlib": str(stdlib), "purelib": str(site)}
    monkeypatch.setattr(module.sysconfig, "get_paths", lambda: paths)
    monkeypatch.setattr(module, "PACKAGES", {})
    return module


def test_build_corpus_refuses_to_replace_a_file_that_is_not_a_corpus(
    build_corpus, tmp_path: Path, monkeypatch, capsys
) -> None:
    """--output README.md replaced README.md with the corpus (opened "w" before any check)."""
    precious = tmp_path / "notes.md"
    precious.write_text("my notes\n")
    code, stderr = _run(build_corpus, ["--output", precious], monkeypatch, capsys)
    assert code == EXIT_ERROR
    _one_error_line(stderr, "build_corpus.py", "exists and is not an earlier corpus")
    assert precious.read_text() == "my notes\n"
    assert not (tmp_path / "notes.manifest.json").exists()


def test_build_corpus_output_that_is_a_directory_is_one_line(
    build_corpus, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Was an IsADirectoryError traceback."""
    code, stderr = _run(build_corpus, ["--output", tmp_path], monkeypatch, capsys)
    assert code == EXIT_ERROR
    _one_error_line(stderr, "build_corpus.py", "is a directory")


def test_build_corpus_rebuilds_its_own_corpus(
    build_corpus, tmp_path: Path, monkeypatch, capsys
) -> None:
    output = tmp_path / "corpus" / "train.jsonl"
    for _ in range(2):  # the second build replaces the first one's corpus and manifest
        code, stderr = _run(build_corpus, ["--output", output], monkeypatch, capsys)
        assert code == 0, stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(record["path"] for record in records) == [
        "python-stdlib:alpha.py",
        "python-stdlib:beta.py",
    ]
    manifest = json.loads((tmp_path / "corpus" / "train.manifest.json").read_text())
    assert manifest["packages"]["python-stdlib"]["files"] == 2
    assert sorted(path.name for path in output.parent.iterdir()) == [
        "train.jsonl",
        "train.manifest.json",
    ]  # no temporary file left


def test_build_corpus_failing_midway_keeps_the_earlier_corpus(
    build_corpus, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The corpus was written in place: a build that stopped part-way (a kill, a full disk,
    a package's metadata missing) left a truncated corpus under the earlier one's name,
    beside the earlier manifest, and train.py trained on it without a word."""
    site = Path(build_corpus.sysconfig.get_paths()["purelib"])
    for package in ("first", "second"):
        (site / package).mkdir()
        (site / package / "module.py").write_text(f"def {package}():\n    return 3\n")
    monkeypatch.setattr(build_corpus, "PACKAGES", {"first": ("first",), "second": ("second",)})
    monkeypatch.setattr(build_corpus, "licence_of", lambda name: "MIT")
    monkeypatch.setattr(build_corpus.metadata, "version", lambda name: "1.0")
    output = tmp_path / "train.jsonl"
    code, stderr = _run(build_corpus, ["--output", output], monkeypatch, capsys)
    assert code == 0, stderr
    earlier = output.read_bytes()
    assert b"second:second/module.py" in earlier

    def version(name: str) -> str:
        raise OSError(28, "No space left on device")  # before the second package's records

    monkeypatch.setattr(build_corpus.metadata, "version", version)
    code, stderr = _run(build_corpus, ["--output", output], monkeypatch, capsys)
    assert code == EXIT_ERROR, stderr
    assert output.read_bytes() == earlier
    assert sorted(path.name for path in tmp_path.iterdir() if "train" in path.name) == [
        "train.jsonl",
        "train.manifest.json",
    ]


# --- benchmarks/train_throughput.py ---------------------------------------------------------


@pytest.fixture()
def train_throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "benchmarks"))
    import train_throughput as module

    def measured(*_args: object) -> None:
        raise AssertionError("the measurement ran before the output folder was checked")

    monkeypatch.setattr(module, "measure_training", measured)
    return module


@pytest.mark.parametrize("where", ["a file", "a foreign result", "models/"])
def test_train_throughput_checks_its_output_before_measuring(
    where: str, train_throughput, tmp_path: Path, monkeypatch, capsys
) -> None:
    """--output_dir was first touched after the measurement (minutes on a GPU): a file
    there, or a folder that cannot be written, lost the measurement in a one-line error;
    a train_throughput.json of something else was replaced."""
    if where == "a file":
        output, fragment = tmp_path / "a_file", "is a file, not a directory"
        output.write_text("x\n")
    elif where == "a foreign result":
        output, fragment = tmp_path / "out", "is not an earlier train_throughput result"
        output.mkdir()
        (output / "train_throughput.json").write_text('{"mine": 1}\n')
    else:
        output = REPOSITORY_ROOT / "models" / "layerskip-stdlib"
        fragment = "is a folder shipped with the project"
    before = {
        path.name: path.read_bytes() for path in (output.iterdir() if output.is_dir() else [])
    }
    code, stderr = _run(train_throughput, ["--output_dir", output], monkeypatch, capsys)
    assert code == EXIT_ERROR
    _one_error_line(stderr, "train_throughput.py", fragment)
    after = {path.name: path.read_bytes() for path in (output.iterdir() if output.is_dir() else [])}
    assert after == before


# --- eval.py --use_cache ----------------------------------------------------------------------


def _eval_argv(model: Path, output: Path, cache: Path) -> list[object]:
    return [
        "--model", model, "--tasks", "layerskip_mc", "--limit", 1, "--bootstrap_iters", 0,
        "--output_dir", output, "--use_cache", cache,
    ]  # fmt: skip


def test_eval_cache_in_a_model_folder_is_refused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """--use_cache is a folder written to like --output_dir: it put eval-*.db files into a
    model's folder, or into models/ (the shipped model's)."""
    import eval as module

    monkeypatch.chdir(REPOSITORY_ROOT)
    before = sorted(path.name for path in tiny_model_dir.iterdir())
    argv = _eval_argv(tiny_model_dir, tmp_path / "logs", tiny_model_dir)
    code, stderr = _run(module, argv, monkeypatch, capsys)
    assert code == EXIT_ERROR
    _one_error_line(stderr, "eval.py", f"--use_cache {tiny_model_dir} holds a model")
    assert sorted(path.name for path in tiny_model_dir.iterdir()) == before


def test_eval_damaged_cache_file_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A request cache cut short (a full disk, a kill while SQLite wrote it) or overwritten
    was a sqlite3.DatabaseError traceback from lm-eval's cache thread."""
    import eval as module

    monkeypatch.chdir(REPOSITORY_ROOT)
    cache = tmp_path / "cache"
    code, stderr = _run(
        module, _eval_argv(tiny_model_dir, tmp_path / "first", cache), monkeypatch, capsys
    )
    assert code == 0, stderr
    (database,) = cache.glob("eval-*.db")
    database.write_bytes(database.read_bytes()[:100])  # the header's first bytes only
    code, stderr = _run(
        module, _eval_argv(tiny_model_dir, tmp_path / "again", cache), monkeypatch, capsys
    )
    assert code == EXIT_ERROR
    _one_error_line(stderr, "eval.py", f"the request cache {database} is damaged")
    database.write_bytes(b"not a database\n")
    code, stderr = _run(
        module, _eval_argv(tiny_model_dir, tmp_path / "again", cache), monkeypatch, capsys
    )
    assert code == EXIT_ERROR
    _one_error_line(stderr, "eval.py", "is damaged (file is not a database)")


# --- generate.py: a reader that leaves --------------------------------------------------------


class _ClosingReader:
    """Standard output whose reader leaves after the first answer (``| head -1``)."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes > 1:
            raise BrokenPipeError(32, "Broken pipe")
        return len(text)

    def flush(self) -> None:
        pass


def test_generate_session_whose_reader_left_says_so(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Prompts piped in, answers piped to ``head -1``: the session ended quietly (exit 141)
    but its result document said ``"ended_by": null``, as if the run were still going. The
    answer whose output failed was generated: it is kept too, and no prompt after it runs."""
    import io

    import generate

    monkeypatch.setattr(sys, "stdin", io.StringIO("def add(a, b):\ndef sub(a, b):\nclass A:\n"))
    monkeypatch.setattr(sys, "stdout", _ClosingReader())
    argv = ["--model", str(tiny_model_dir), "--max_steps", "4", "--sample", "False"]
    with pytest.raises(BrokenPipeError):
        generate.main([*argv, "--streamer", "none", "--output_dir", str(tmp_path)])
    (result,) = tmp_path.glob("generate_*.json")
    document = json.loads(result.read_text())
    assert document["ended_by"] == "output closed"
    assert [row["prompt"] for row in document["prompts"]] == ["def add(a, b):", "def sub(a, b):"]


# --- train.py --overwrite True ------------------------------------------------------------------


def test_train_overwrite_leaves_no_earlier_model_beside_the_new_run(tmp_path: Path) -> None:
    """--overwrite True removed an earlier run's checkpoint, log and summary, but kept its
    exported model (config.json, weights, tokenizer) until the new run exported its own: a
    new run that stopped first (a kill, an error) left the folder with the new run's
    train_config.json beside the old model, which every script then loaded as the new one."""
    import subprocess

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text(
        "".join(f"def f_{n}(value):\n    return value * {n}\n" for n in range(200))
    )
    output = tmp_path / "run"
    common = [
        sys.executable, str(REPOSITORY_ROOT / "train.py"),
        "--seq_len", "32", "--batch_size", "4", "--warmup_steps", "2",
        "--num_threads", "1", "--save_every_minutes", "0", "--max_tokens", str(2 * 4 * 32),
        "--bf16", "False", "--data", f"{corpus}/*.py", "--output_dir", str(output),
    ]  # fmt: skip

    def train(*extra: str, model: tuple[str, ...] = ("--preset", "tiny", "--vocab_size", "300")):
        return subprocess.run(
            [*common, *model, *extra],
            cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    first = train()
    assert first.returncode == 0, first.stderr[-3000:]
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    earlier = (output / "model.safetensors").read_bytes()
    # A configuration error before the new run starts keeps the earlier model.
    refused = train("--overwrite", "True", "--batch_size", "100000")
    assert refused.returncode == EXIT_ERROR and "--batch_size 100000" in refused.stderr
    assert (output / "model.safetensors").read_bytes() == earlier
    # A run continuing the model saved there keeps it until its own export replaces it.
    continued = train("--overwrite", "True", model=("--model", str(output)))
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert (output / "model.safetensors").read_bytes() != earlier
    # A new run over it that stops before its export (here: its loss diverges).
    second = train(
        "--overwrite", "True", "--learning_rate", "1e30", "--warmup_steps", "0",
        "--max_tokens", str(6 * 4 * 32),
    )  # fmt: skip
    assert second.returncode == EXIT_ERROR and "diverged" in second.stderr, second.stderr[-3000:]
    left = sorted(path.name for path in output.iterdir())
    assert "train_config.json" in left
    assert not {"config.json", "model.safetensors", "tokenizer.json"} & set(left), left


def test_eval_request_cache_locked_by_another_run_is_not_called_damaged(tmp_path: Path) -> None:
    """Another run holding the cache's lock: the line says so, and does not advise deleting
    the file (which would lose that run's answers)."""
    import sqlite3

    import eval as eval_script

    database = tmp_path / "eval-x_rank0.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE t (x)")
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(eval_script.ConfigError, match="in use by another run") as info:
            eval_script._check_cache_file(database)
        assert "delete" not in str(info.value)
    finally:
        holder.close()
    eval_script._check_cache_file(database)  # free again: fine
