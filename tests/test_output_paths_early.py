"""Where results go, and what a script reads back: a result file whose folder cannot be
made is refused before the run (the benchmarks measured for minutes, then lost every
figure at the end), an output folder that is a dangling symbolic link is refused before the
model loads ("File exists" came after it), so is a folder a sweep holds (the refusal came
once the weights had loaded), a benchmark's ``--output=~/x.json`` goes to $HOME (it was
checked there and written to ./~/x.json), and an engine.py result that is not UTF-8 is
one line from batch_bound.py, not a traceback (hunt 69)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from arguments import EXIT_ERROR, run_main
from self_speculation import ConfigError
from self_speculation.output_safety import check_output_dir, check_output_file

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(REPOSITORY_ROOT)
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "benchmarks"))
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, prog=f"{script}.py")
    return exit_info.value.code, capsys.readouterr().err


def test_a_result_file_under_a_file_is_refused_before_the_run(tmp_path: Path) -> None:
    """benchmarks/*.py write --output at the end: a folder that is a file failed there."""
    blocker = tmp_path / "results"
    blocker.write_text("not a folder\n")
    with pytest.raises(ConfigError, match=r"results is a file, not a directory"):
        check_output_file(str(blocker / "engine.json"), "engine", ("arguments",))
    assert check_output_file(str(tmp_path / "new" / "engine.json"), "engine", ()).name


def test_drafting_bound_refuses_its_output_before_loading_the_model(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """No model is loaded (the path does not exist): the output is what is refused."""
    blocker = tmp_path / "results"
    blocker.write_text("not a folder\n")
    argv = ["--model", str(tmp_path / "no-model"), "--output", str(blocker / "bound.json")]
    code, stderr = _run("drafting_bound", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"drafting_bound.py: error: --output's folder {blocker} is a file, not a directory "
        "(choose another --output's folder)"
    )


@pytest.mark.parametrize("below", ["", "run1"])
def test_an_output_dir_through_a_dangling_link_is_refused(tmp_path: Path, below: str) -> None:
    link = tmp_path / "logs"
    os.symlink(tmp_path / "gone" / "logs", link)
    path = link / below if below else link
    with pytest.raises(ConfigError, match=r"is a symbolic link to .*gone.*which does not exist"):
        check_output_dir(str(path))
    (tmp_path / "gone" / "logs").mkdir(parents=True)
    check_output_dir(str(path))  # the link's target made: fine


def test_generate_refuses_a_dangling_output_dir_before_loading(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    link = tmp_path / "logs"
    os.symlink(tmp_path / "gone", link)
    generate = importlib.import_module("generate")
    loaded = []
    monkeypatch.setattr("arguments.Arguments.load_generator", lambda *a, **k: loaded.append(1))
    argv = ["--model", str(tiny_model_dir), "--prompt", "hi", "--output_dir", str(link)]
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(generate.main, prog="generate.py")
    stderr = capsys.readouterr().err
    assert exit_info.value.code == EXIT_ERROR and not loaded
    assert "is a symbolic link to" in stderr.strip().splitlines()[-1]


def test_batch_bound_reads_an_engine_result_that_is_not_utf8_in_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    engine = tmp_path / "engine.json"
    engine.write_bytes(b'{"batch": "\xff\xfe"}\n')
    code, stderr = _run("batch_bound", ["--engine_json", str(engine)], monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "batch_bound.py: error: --engine_json: not UTF-8 text (byte 0xff at 11)"
    )


@pytest.mark.parametrize("script", ["generate", "benchmark", "correctness", "eval"])
def test_a_folder_in_use_is_refused_before_the_model_loads(
    script: str, held_folder: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The refusal came only once the weights had loaded (minutes for a large model)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "def add(a, b):", "response": " return a + b"}\n')
    extra = {
        "generate": ["--prompt", "hi"],
        "benchmark": ["--dataset", "custom_jsonl", "--data_path", str(data)],
        "correctness": [
            "--dataset",
            "custom_jsonl",
            "--data_path",
            str(data),
            "--exit_layer",
            "2",
            "--num_speculations",
            "2",
        ],
        "eval": ["--tasks", "layerskip_mc"],
    }[script]
    loaded = []
    monkeypatch.setattr(
        "arguments.Arguments.load_generator", lambda *args, **kwargs: loaded.append(1)
    )
    argv = ["--model", str(tiny_model_dir), "--max_steps", "2", *extra]
    code, stderr = _run(script, [*argv, "--output_dir", str(held_folder)], monkeypatch, capsys)
    assert code == EXIT_ERROR and not loaded
    assert stderr.strip().splitlines()[-1] == (
        f"{script}.py: error: --output_dir {held_folder} is in use by another run "
        "writing there: wait for it to finish, or choose another --output_dir"
    )


@pytest.mark.parametrize(
    ("module", "arguments", "field"),
    [
        ("benchmarks.drafting_bound", "BoundArguments", "output"),
        ("benchmarks.engine", "EngineArguments", "output"),
        ("benchmarks.adapter", "AdapterBenchmarkArguments", "output"),
        ("benchmarks.train_throughput", "ThroughputArguments", "output_dir"),
    ],
)
def test_a_benchmark_output_under_home_goes_there_not_into_a_folder_named_tilde(
    module: str, arguments: str, field: str, tmp_path: Path, monkeypatch
) -> None:
    """``--output=~/bound.json`` (no shell expands it there) was checked at $HOME but
    written to ./~/bound.json."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    target = "~/results/bound.json" if field == "output" else "~/results"
    parsed = getattr(importlib.import_module(module), arguments)(**{field: target})
    assert getattr(parsed, field) == str(tmp_path / target[2:])
