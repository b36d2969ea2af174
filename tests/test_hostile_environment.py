"""The scripts in the process environments users' shells and clusters give them: a standard
output that cannot encode every character, or one closed at start."""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

from arguments import run_main


def run_generate(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    generate = importlib.import_module("generate")
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(generate.main, prog="generate.py")
    return exit_info.value.code


def generate_argv(model: Path, output: Path, streamer: str) -> list[str]:
    # The tiny model answers "hello" with bytes that are no whole character: U+FFFD.
    return [
        "--model", str(model), "--prompt", "hello", "--max_steps", "8", "--sample", "False",
        "--streamer", streamer, "--output_dir", str(output),
    ]  # fmt: skip


@pytest.mark.parametrize("streamer", ["standard", "none"])
def test_generate_answers_into_an_ascii_standard_output(
    streamer: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PYTHONIOENCODING=ascii (or a latin-1 locale) and an answer with other characters:
    UnicodeEncodeError mid-answer, a traceback, and no result document."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    code = run_generate(generate_argv(tiny_model_dir, tmp_path, streamer), monkeypatch)
    assert code == 0
    (result,) = tmp_path.glob("generate_*.json")
    text = json.loads(result.read_text())["prompts"][0]["text"]
    assert not text.isascii()  # what the test is about: the document keeps it as it is
    sys.stdout.flush()
    assert raw.getvalue().decode("ascii").strip() == text.encode(
        "ascii", "backslashreplace"
    ).decode("ascii")


def test_generate_with_standard_output_closed_keeps_its_answer(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python generate.py ... >&-`` (cron, daemons): sys.stdout is None, and writing the
    answer raised AttributeError: a traceback, and no result document."""
    monkeypatch.setattr(sys, "stdout", None)
    code = run_generate(generate_argv(tiny_model_dir, tmp_path, "standard"), monkeypatch)
    assert code == 0
    (result,) = tmp_path.glob("generate_*.json")
    assert json.loads(result.read_text())["prompts"][0]["text"]


class _ReaderLeavingAfter:
    """Standard output whose reader leaves after ``writes`` writes (``| head -c 5``)."""

    def __init__(self, writes: int) -> None:
        self.writes_left = writes
        self.descriptor = os.open(os.devnull, os.O_WRONLY)  # run_main points it at devnull

    def write(self, text: str) -> int:
        if self.writes_left == 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.writes_left -= 1
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.descriptor


def test_generate_one_prompt_whose_reader_left_mid_answer_keeps_the_answer(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generate.py --prompt P | head -1`` with an answer of several lines: the stream's
    BrokenPipeError ended the run (exit 141) with no result document at all."""
    output = _ReaderLeavingAfter(2)
    monkeypatch.setattr(sys, "stdout", output)
    argv = generate_argv(tiny_model_dir, tmp_path, "standard")
    try:
        code = run_generate([*argv, "--max_steps", "12"], monkeypatch)
    finally:
        os.close(output.descriptor)
    assert code == 141  # quiet, as a closed output is
    (result,) = tmp_path.glob("generate_*.json")
    document = json.loads(result.read_text())
    assert document["ended_by"] == "output closed"
    (row,) = document["prompts"]
    assert row["prompt"] == "hello" and row["num_generated_tokens"] == 12


def test_utf8_prompts_from_an_ascii_standard_input_are_read_as_written() -> None:
    """PYTHONIOENCODING=ascii and "café" piped in: the prompt was refused as "byte 0xc3 is
    not UTF-8", which it is; bytes that are not UTF-8 are still refused, naming the byte."""
    from generate import read_prompts

    piped = io.TextIOWrapper(io.BytesIO("café\nab\n".encode()), encoding="ascii")
    assert list(read_prompts(piped)) == ["café", "ab"]
    latin = io.TextIOWrapper(io.BytesIO("café\n".encode()), encoding="latin-1")
    assert list(read_prompts(latin)) == ["cafÃ©"]  # what that encoding reads, unchanged
    (not_utf8,) = read_prompts(io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="ascii"))
    assert not_utf8 == "caf\udce9"


def test_utf8_arguments_in_an_ascii_locale_are_read_as_written(tmp_path: Path) -> None:
    """LC_ALL=C with PYTHONUTF8=0: Python decodes arguments as ASCII with surrogateescape,
    and a UTF-8 --prompt ("café") was refused as "byte 0xc3 is not UTF-8"; bytes that are
    not UTF-8 are still refused, naming the byte."""
    import subprocess

    code = (
        "import sys, generate, arguments\n"
        "from self_speculation.errors import ConfigError\n"
        "print(ascii(generate.GenerateArguments(prompt=sys.argv[1]).prompt))\n"
        "print(ascii(arguments.GenerationArguments(stop_words=[sys.argv[1]]).stop_words))\n"
        "try:\n"
        "    generate.GenerateArguments(prompt=sys.argv[2])\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(root)}
    environment.pop("LANG", None)
    completed = subprocess.run(
        [sys.executable, "-c", code, "café".encode(), b"caf\xe9"],
        env=environment,
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = completed.stdout.splitlines()
    assert lines[:2] == ["'caf\\xe9'", "['caf\\xe9']"]
    assert "byte 0xe9 is not UTF-8" in lines[2]
