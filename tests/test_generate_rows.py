"""generate.py over many piped prompts: each answer is appended to a rows file as it is
given, and the result document is written twice in all (after the first answer and at the
end), not rewritten whole after every answer (quadratic over thousands of prompts)."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_scripts import OFFLINE_ENV, REPOSITORY_ROOT

from self_speculation import Generator
from self_speculation.benchmarking import read_jsonl_rows

PROMPTS = ["def add(a, b):", "import os", "class A:", "x = 1", "for i in range(3):", "# hi"]


def _argv(model: Path, output: Path) -> list[str]:
    return [
        "--model", str(model), "--max_steps", "3", "--sample", "False", "--streamer", "none",
        "--output_dir", str(output),
    ]  # fmt: skip


def test_piped_prompts_are_rows_and_the_document_is_written_twice(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    generate = importlib.import_module("generate")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
    writes = []
    real_write = generate.write_json_atomic

    def counted_write(path, document):
        writes.append(len(document["prompts"]))
        real_write(path, document)

    monkeypatch.setattr(generate, "write_json_atomic", counted_write)
    assert generate.main(_argv(tiny_model_dir, tmp_path)) == 0
    assert writes == [1, len(PROMPTS)]
    (result,) = tmp_path.glob("generate_*.json")
    document = json.loads(result.read_text())
    rows = read_jsonl_rows(document["samples_file"])
    assert [row["prompt"] for row in rows] == PROMPTS
    assert rows == document["prompts"]
    assert document["environment"]["decoding_path"] == "eager"
    assert capsys.readouterr().out.count("\n") == len(PROMPTS)


def test_no_prompt_leaves_no_rows_file(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate = importlib.import_module("generate")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert generate.main(_argv(tiny_model_dir, tmp_path)) == 0
    assert not list(tmp_path.glob("*.jsonl"))
    (result,) = tmp_path.glob("generate_*.json")
    document = json.loads(result.read_text())
    assert document["prompts"] == [] and "samples_file" not in document


def test_an_unexpected_error_still_writes_the_answers_given(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The third answer fails with an error no one planned for: the document still holds the
    two answers before it (they were only in the rows file)."""
    generate = importlib.import_module("generate")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
    real_generate = Generator.generate
    calls = []

    def failing_generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate.main(_argv(tiny_model_dir, tmp_path))
    (result,) = tmp_path.glob("generate_*.json")
    document = json.loads(result.read_text())
    assert [row["prompt"] for row in document["prompts"]] == PROMPTS[:2]


def test_a_killed_session_keeps_every_answer_in_its_rows(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL (nothing runs after it): the rows file holds every answer given, whole."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    env.update(OFFLINE_ENV)
    process = subprocess.Popen(
        [sys.executable, str(REPOSITORY_ROOT / "generate.py"), *_argv(tiny_model_dir, tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=REPOSITORY_ROOT,
    )  # fmt: skip
    process.stdin.write("\n".join(PROMPTS[:3]) + "\n")
    process.stdin.flush()  # stdin stays open: the session waits for the next prompt
    deadline = time.monotonic() + 180
    rows = []
    while time.monotonic() < deadline and process.poll() is None and len(rows) < 3:
        written = list(tmp_path.glob("generate_*.samples.jsonl"))
        rows = read_jsonl_rows(written[0]) if written else []
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    (samples,) = tmp_path.glob("generate_*.samples.jsonl")
    assert [row["prompt"] for row in read_jsonl_rows(samples)] == PROMPTS[:3]
    (result,) = tmp_path.glob("generate_*[0-9].json")
    assert json.loads(result.read_text())["ended_by"] is None  # killed: never got to say


def test_a_deleted_output_folder_is_not_recreated(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The folder removed during the session: the next answer's row fails naming its file,
    and the end of the session does not bring the folder back for a document alone."""
    generate = importlib.import_module("generate")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
    output = tmp_path / "logs"
    real_generate = Generator.generate
    calls = []

    def deleting_generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            shutil.rmtree(output)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", deleting_generate)
    with pytest.raises(FileNotFoundError, match="removed while the run was writing it"):
        generate.main(_argv(tiny_model_dir, output))
    assert not output.exists()
